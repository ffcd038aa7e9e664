"""``mlmtool tokenizer`` against bare ``tokenizers`` training with the same settings, same run.

    python scripts/bench_tokenizer.py                      # Linux kernel docs (21 MB), 3 repeats
    python scripts/bench_tokenizer.py --corpus FILE --vocab-size 8192 --repeats 5

Set-up: the corpus is decompressed into a temporary directory and ``mlmtool init DIR
--preset roberta-base`` makes the model directory.  Each repeat then runs, in
subprocesses and in turn (the order rotates from one repeat to the next):

* ours, end to end: ``mlmtool tokenizer DIR CORPUS --vocab-size V --json`` (the installed
  console script: imports, reading the corpus, training, saving the
  tokenizer files, config.json); its ``seconds`` field is the training part (``train_from_iterator``,
  corpus streaming included);
* ours, training part alone: the same tokenizer, trainer and corpus batches as the
  command (``build_tokenizer``, ``build_trainer``, ``Corpus.batches(TRAIN_BATCH_BYTES)`` into
  ``train_from_iterator``), timed in wall and CPU seconds in a child process;
* bare, files: ``ByteLevelBPETokenizer(add_prefix_space=False).train([CORPUS], vocab_size=V,
  min_frequency=2, special_tokens=[<s>, <pad>, </s>, <unk>, <mask>])`` (tokenizers reads the
  file itself: its fastest path) and ``save(tokenizer.json)``;
* bare, iterator: the same through ``train_from_iterator`` over batches of 1000 lines read
  in Python, as the seed notebook feeds it.

Speed is reported as bare time / our time (100 % = as fast as bare; the target is >= 90 %),
end to end and for the training part, in wall and CPU seconds, medians over the repeats.
The vocabularies and merges of ours and bare are compared (they should be identical).

Ends with one JSON line.  See docs/benchmarks.md ("Tokenizer") for results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_proc import (add_corpus_argument, decompress, format_machine, machine_info,  # noqa: E402
                         median, mlmtool_exe, print_json, run_measured)

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
TARGET = 0.90


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_argument(p)
    p.add_argument("--vocab-size", type=int, default=50265, help="vocabulary (default 50265, roberta-base's)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each run (default 3; medians reported)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one timed training in a child process
    return p.parse_args(argv)


# -- child processes ------------------------------------------------------------------------

def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()  # process_time: every thread of this process


def bare_worker(spec: dict) -> dict:
    w0, c0 = _clock()
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    w1, c1 = _clock()
    kwargs = dict(vocab_size=spec["vocab_size"], min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    if spec["mode"] == "files":
        tok.train([spec["corpus"]], **kwargs)
    else:
        def batch_iterator(batch_size=1000):
            with open(spec["corpus"], encoding="utf-8") as f:
                batch = []
                for line in f:
                    batch.append(line.rstrip("\n"))
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
                if batch:
                    yield batch

        tok.train_from_iterator(batch_iterator(), **kwargs)
    w2, c2 = _clock()
    tok.save(spec["out"])
    w3, c3 = _clock()
    return {"train_wall_s": w2 - w1, "train_cpu_s": c2 - c1, "import_wall_s": w1 - w0,
            "save_wall_s": w3 - w2, "vocab_size": tok.get_vocab_size()}


def ours_train_worker(spec: dict) -> dict:
    """The training call of ``mlmtool tokenizer``, with the same objects, timed alone."""
    w0, c0 = _clock()
    from mlmtool.data.corpus import open_corpus
    from mlmtool.data.tokenizer_train import TRAIN_BATCH_BYTES, build_tokenizer, build_trainer

    corpus = open_corpus([spec["corpus"]])
    tok = build_tokenizer("bpe", lowercase=False)
    trainer = build_trainer("bpe", vocab_size=spec["vocab_size"], min_frequency=2)
    w1, c1 = _clock()
    batches = (b.documents for b in corpus.batches(batch_bytes=TRAIN_BATCH_BYTES) if b.documents)
    tok.train_from_iterator(batches, trainer=trainer)
    w2, c2 = _clock()
    return {"train_wall_s": w2 - w1, "train_cpu_s": c2 - c1, "import_wall_s": w1 - w0,
            "vocab_size": tok.get_vocab_size()}


def child(kind: str, spec: dict):
    m = run_measured([sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})])
    return m, m.json_tail()


# -- comparison of the results ----------------------------------------------------------------

def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def same_model(a: Path, b: Path) -> dict:
    ma = json.loads(a.read_text(encoding="utf-8"))["model"]
    mb = json.loads(b.read_text(encoding="utf-8"))["model"]
    xa, xb = _merges(ma), _merges(mb)
    return {"vocab_equal": ma["vocab"] == mb["vocab"], "merges_equal": xa == xb,
            "vocab": [len(ma["vocab"]), len(mb["vocab"])], "merges": [len(xa), len(xb)]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        fn = ours_train_worker if spec["kind"] == "ours_train" else bare_worker
        print(json.dumps(fn(spec)))
        return

    info = machine_info("tokenizers", "transformers")
    print(format_machine(info))
    tmp = Path(tempfile.mkdtemp(prefix="bench_tokenizer."))
    try:
        corpus = decompress(args.corpus, tmp / "corpus.txt")
        mb = corpus.stat().st_size / 1e6
        model_dir = tmp / "model"
        exe = mlmtool_exe()
        run_measured([exe, "init", str(model_dir), "--preset", "roberta-base"])
        print(f"corpus:  {args.corpus} -> {mb:.1f} MB; vocab {args.vocab_size:,}, min_frequency 2, "
              f"{args.repeats} repeats\n", flush=True)

        spec = {"corpus": str(corpus), "vocab_size": args.vocab_size}
        names = ["ours_cli", "ours_train", "bare_files", "bare_iterator"]
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                if name == "ours_cli":
                    m = run_measured([exe, "tokenizer", str(model_dir), str(corpus), "--vocab-size",
                                      str(args.vocab_size), "--json"])
                    out = m.json_tail()
                    row = m.summary() | {"train_wall_s": out["seconds"]}
                elif name == "ours_train":
                    m, out = child("ours_train", spec)
                    row = m.summary() | {k: out[k] for k in ("train_wall_s", "train_cpu_s")}
                else:
                    mode = name.split("_", 1)[1]
                    m, out = child("bare", spec | {"mode": mode, "out": str(tmp / f"bare_{mode}.json")})
                    row = m.summary() | {k: out[k] for k in ("train_wall_s", "train_cpu_s", "save_wall_s")}
                runs[name].append(row)
                print(f"#{r + 1} {name:<14} wall {row['wall_s']:6.2f} s  CPU {row['cpu_s']:6.2f} s  "
                      f"training {row['train_wall_s']:6.2f} s", flush=True)

        med = {n: {k: median([x[k] for x in rows]) for k in rows[0] if isinstance(rows[0][k], (int, float))}
               for n, rows in runs.items()}
        print(f"\nmedians over {args.repeats} repeats (seconds)")
        print(f"{'':<15}{'wall':>8}{'CPU':>8}{'train wall':>12}{'train CPU':>11}{'MB/s':>7}")
        for n, row in med.items():
            tc = f"{row['train_cpu_s']:>11.2f}" if "train_cpu_s" in row else f"{'-':>11}"
            print(f"{n:<15}{row['wall_s']:>8.2f}{row['cpu_s']:>8.2f}{row['train_wall_s']:>12.2f}{tc}"
                  f"{mb / row['wall_s']:>7.2f}")

        def pct(bare: float, ours: float) -> float:
            return bare / ours  # our speed as a fraction of bare speed

        speed = {}
        for peer in ("bare_files", "bare_iterator"):
            b = med[peer]
            speed[peer] = {
                "end_to_end_wall": pct(b["wall_s"], med["ours_cli"]["wall_s"]),
                "end_to_end_cpu": pct(b["cpu_s"], med["ours_cli"]["cpu_s"]),
                "train_wall_cli": pct(b["train_wall_s"], med["ours_cli"]["train_wall_s"]),
                "train_wall": pct(b["train_wall_s"], med["ours_train"]["train_wall_s"]),
                "train_cpu": pct(b["train_cpu_s"], med["ours_train"]["train_cpu_s"]),
            }
        agree = {peer: same_model(model_dir / "tokenizer.json", tmp / f"bare_{peer.split('_', 1)[1]}.json")
                 for peer in ("bare_files", "bare_iterator")}
        print(f"\nour speed as % of bare (bare time / our time; target >= {TARGET:.0%}):")
        for peer, s in speed.items():
            cells = ", ".join(f"{k.replace('_', ' ')} {100 * v:.0f}%" for k, v in s.items())
            print(f"  vs {peer}: {cells}")
        missed = {f"{peer}.{k}": v for peer, s in speed.items() for k, v in s.items() if v < TARGET}
        print("  target: " + ("met everywhere" if not missed else "MISSED for " + ", ".join(
            f"{k} ({100 * v:.0f}%)" for k, v in missed.items())))
        for peer, a in agree.items():
            print(f"same vocabulary and merges as {peer}: vocab {a['vocab_equal']}, merges {a['merges_equal']} "
                  f"({a['vocab'][0]:,} tokens, {a['merges'][0]:,} merges)")
        info["loadavg_after"] = list(os.getloadavg())
        print_json({"benchmark": "tokenizer", "machine": info, "corpus": args.corpus,
                    "corpus_bytes": corpus.stat().st_size, "vocab_size": args.vocab_size,
                    "repeats": args.repeats, "runs": runs, "medians": med, "speed_vs_bare": speed,
                    "target": TARGET, "missed": missed, "same_model": agree})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
