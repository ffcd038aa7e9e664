#!/usr/bin/env python
"""Which family and recipe learn most for the same data and steps: pre-train each, then judge it.

    python scripts/compare_recipes.py WORKDIR [--steps 250] [--recipes roberta,bert,modernbert,modernbert-docs,electra]

Every recipe pre-trains a tiny preset from scratch on the same real text (Jane Austen's novels
from ../shared/corpora, all but the last 29 chapters), with the same tokenizer size (8,192),
blocks of 128 tokens, batch 32, the same number of steps (so the same tokens seen), learning
rate 2e-3 with 50 warm-up steps.  ``electra`` is ``electra-tiny``: the same 2 x 128 encoder
as the discriminator, a 2 x 32 generator, replaced-token detection (its eval loss is the small
generator's MLM, its minimal pairs are scored by the discriminator, ``mlmtool.minimal_pairs``).
Then for each: ``mlmtool eval`` (masked LM at 15%, where
comparable: the tokenizers differ), the minimal-pair accuracy on pairs made from the held-out
chapters (``scripts/make_minimal_pairs.py --skip-documents 240``), and, with ``--probe``, the
linear probe of ``scripts/bench_quality.py`` (its default).  Training time is CPU seconds of the train
process (``getrusage`` of the child), with ``/proc/loadavg`` beside it.  One JSON line per
recipe on stdout and in WORKDIR/results.jsonl.  ``--stage train`` only pre-trains.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT.parent / "shared" / "corpora"
if not CORPORA.exists():
    CORPORA = Path("/work/shared/corpora")
MLMTOOL = [sys.executable, "-m", "mlmtool"]
HELD_OUT = 240  # Austen chapters 0..239 train, 240.. are held out (pairs)

RECIPES = {
    "roberta": ("roberta-tiny", []),
    "bert": ("bert-tiny", []),
    "modernbert": ("modernbert-tiny", ["--mlm-probability", "0.3", "--no-document-attention"]),
    "modernbert-docs": ("modernbert-tiny", ["--mlm-probability", "0.3", "--document-attention"]),
    "electra": ("electra-tiny", []),
}


def run(args: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if out.returncode:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def corpus_files(work: Path) -> tuple[Path, Path]:
    train, pairs = work / "austen_train.txt", work / "pairs_heldout.jsonl"
    if not train.exists():
        with lzma.open(CORPORA / "en_austen.txt.xz", "rt", encoding="utf-8") as f:
            docs = f.read().splitlines()
        train.write_text("\n".join(docs[:HELD_OUT]) + "\n", encoding="utf-8")
    if not pairs.exists():
        run([sys.executable, ROOT / "scripts" / "make_minimal_pairs.py", CORPORA / "en_austen.txt.xz", "-o", pairs,
             "--skip-documents", HELD_OUT, "--per-set", 100])
    return train, pairs


def pretrain(work: Path, name: str, steps: int, train_text: Path) -> dict:
    preset, extra = RECIPES[name]
    d = work / name
    done = d / "train_cpu.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(d, ignore_errors=True)
    run(MLMTOOL + ["init", d, "--preset", preset])
    run(MLMTOOL + ["tokenizer", d, train_text, "--vocab-size", 8192])
    run(MLMTOOL + ["prepare", d, train_text, "--max-seq-length", 128, "--validation-split-percentage", 5])
    load_before, cpu, wall = os.getloadavg(), child_cpu(), time.perf_counter()
    run(MLMTOOL + ["train", d, "--max-steps", steps, "--per-device-train-batch-size", 32, "--learning-rate", 2e-3,
                   "--warmup-steps", 50, "--logging-steps", 50, "--save-steps", steps, *extra])
    info = {"recipe": name, "preset": preset, "train_args": extra, "steps": steps,
            "train_cpu_s": round(child_cpu() - cpu, 1), "train_wall_s": round(time.perf_counter() - wall, 1),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    done.write_text(json.dumps(info), encoding="utf-8")
    return info


def judge(work: Path, name: str, pairs: Path, probe: bool) -> dict:
    d = work / name
    ev = json.loads(run(MLMTOOL + ["eval", d, "--json"]).stdout.strip().splitlines()[-1])
    mp = json.loads(run(MLMTOOL + ["eval", d, "--minimal-pairs", pairs, "--json"]).stdout.strip().splitlines()[-1])
    out = {"eval_loss": ev["eval_loss"], "eval_accuracy": ev["eval_accuracy"],
           **{k: ev[k] for k in ("eval_rtd_accuracy", "eval_rtd_loss") if k in ev},  # ELECTRA's discriminator
           "minimal_pairs_scorer": mp["scorer"], "minimal_pairs_accuracy": mp["minimal_pairs_accuracy"],
           "minimal_pairs": {k: v["accuracy"] for k, v in mp["minimal_pairs"].items()}}
    if probe:
        line = run([sys.executable, ROOT / "scripts" / "bench_quality.py", d, "--pairs", pairs]).stdout
        q = json.loads(line.strip().splitlines()[-1])
        out.update(probe_accuracy_mean=q["probe_accuracy_mean"], probe_accuracy_sd=q["probe_accuracy_sd"],
                   probe_cpu_s=q["probe_cpu_s"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--stage", choices=("train", "all"), default="all")
    p.add_argument("--probe", action="store_true", help="also run the linear probe (scripts/bench_quality.py)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    train_text, pairs = corpus_files(args.workdir)
    for name in args.recipes.split(","):
        info = pretrain(args.workdir, name, args.steps, train_text)
        if args.stage == "all":
            info.update(judge(args.workdir, name, pairs, args.probe), loadavg_judged=os.getloadavg())
            with open(args.workdir / "results.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(info) + "\n")
        print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
