#!/usr/bin/env python
"""Judge exported models by what they can do: a fine-tuning probe and minimal pairs.

    python scripts/bench_quality.py DIR... [--pairs FILE] [--random] [--task order|source] [--seeds 0,1,2]

For each model directory (an export: model.safetensors + tokenizer), one JSON line:

* **probe**: transformers' ``AutoModelForSequenceClassification`` on the export, fine-tuned
  with transformers' ``Trainer`` (PyTorch, CPU) on a task built from real sentences of the four
  corpora in ``../shared/corpora`` (Austen, Brown, the King James Bible, the Linux kernel
  docs), then its accuracy on held-out sentences, over three seeds (the seed draws the new
  head, dropout and the data order; the examples are the same): ``probe_accuracy_mean``,
  ``probe_accuracy_sd`` and each seed's.  The tasks (``--task``):

  - ``order`` (default): is the sentence as written, or are two adjacent words swapped
    (``scripts/make_minimal_pairs.py``'s swap, at a place the sentence's hash picks)?  Binary,
    balanced; each sentence appears once, either way.  Nothing in a bag of tokens tells the
    two apart, so a random encoder fine-tuned on a few hundred examples stays near 50%: the
    score is what pre-training taught about word order.
  - ``source``: which of the four corpora the sentence comes from (4 classes, balanced).  The
    vocabulary gives much of it away, so it separates models less; kept as the easy check.

  Train and test sentences come from different documents (the first 80% of each corpus's
  documents train, the rest test).
* **minimal pairs** (with ``--pairs FILE``): the accuracy of ``mlmtool eval --minimal-pairs``
  (PLL-word-l2r; an ELECTRA export: its discriminator's score; ties wrong) on that set,
  computed by the same library.

``--random`` adds, for each DIR, the same network with freshly initialised weights
(``from_config``; for the pairs, ``mlmtool``'s initialisation): the baseline the probe must beat.
CPU seconds (``time.process_time``, all threads) and ``/proc/loadavg`` are in each line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
CORPORA = ROOT.parent / "shared" / "corpora"
if not CORPORA.exists():
    CORPORA = Path("/work/shared/corpora")
SOURCES = ("en_austen", "en_brown", "en_kjv_bible", "en_linux_kernel_docs")


def corpus_sentences(name: str, per_corpus: int) -> tuple[list[str], list[str]]:
    """Up to ``per_corpus`` distinct sentences (5-30 words, ASCII) from the first 80% of the
    corpus's documents and as many from the rest."""
    from make_minimal_pairs import MAX_WORDS, MIN_WORDS, SENTENCE_END

    with lzma.open(CORPORA / f"{name}.txt.xz", "rt", encoding="utf-8") as f:
        docs = f.read().splitlines()
    cut = int(len(docs) * 0.8)
    out = []
    for part in (docs[:cut], docs[cut:]):
        seen, got = set(), []
        # documents evenly spaced through the part, so one long document does not fill it
        for doc in part[::max(1, len(part) // 60)] + part:
            for s in SENTENCE_END.split(doc.strip())[:20]:
                if s.isascii() and MIN_WORDS <= len(s.split()) <= MAX_WORDS and s not in seen:
                    seen.add(s)
                    got.append(s)
            if len(got) >= per_corpus:
                break
        out.append(got[:per_corpus])
    return out[0], out[1]


def make_task(task: str, per_corpus: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(train examples, test examples, number of labels)."""
    from make_minimal_pairs import swap_adjacent

    train, test = [], []
    for label, name in enumerate(SOURCES):
        tr, te = corpus_sentences(name, per_corpus)
        for part, dest in ((tr, train), (te, test)):
            for s in part:
                if task == "source":
                    dest.append((s, label))
                    continue
                flip = hashlib.sha256(s.encode()).digest()[0] % 2  # half of them swapped
                swapped = swap_adjacent(s.split(), s) if flip else None
                dest.append((" ".join(swapped), 1) if swapped else (s, 0))
    return train, test, 4 if task == "source" else 2


def finetune(model_dir: Path, train, test, num_labels: int, seed: int, random_init: bool, epochs: float,
             learning_rate: float) -> float:
    import numpy as np
    import torch
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if random_init:
        config = AutoConfig.from_pretrained(str(model_dir), num_labels=num_labels)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=num_labels)

    class Data(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.enc = tok([t for t, _ in examples], truncation=True, max_length=64)
            self.labels = [y for _, y in examples]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                 learning_rate=learning_rate, num_train_epochs=epochs, warmup_steps=0.1,
                                 weight_decay=0.01, seed=seed, data_seed=seed, save_strategy="no",
                                 report_to=[], logging_strategy="no", use_cpu=True, disable_tqdm=True,
                                 dataloader_num_workers=0)
        from transformers import DataCollatorWithPadding

        trainer = Trainer(model=model, args=args, train_dataset=Data(train), data_collator=DataCollatorWithPadding(tok))
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary: stdout is the JSON lines
            trainer.train()
            pred = trainer.predict(Data(test))
    return float(np.mean(np.argmax(pred.predictions, axis=-1) == pred.label_ids))


def pairs_accuracy(model_dir: Path, pairs_file: Path, random_init: bool) -> float:
    import jax

    from mlmtool.minimal_pairs import accuracy, read_pairs, scorer_for
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    mdir = ModelDir(model_dir)
    loaded = load_model(mdir.read_config())
    params = loaded.init(jax.random.PRNGKey(0)) if random_init else loaded.load_hf(mdir.weights_path)
    return accuracy(read_pairs([pairs_file]), scorer_for(mdir, loaded, params))["minimal_pairs_accuracy"]


def judge(model_dir: Path, args, task_data, random_init: bool) -> dict:
    train, test, num_labels = task_data
    cpu = time.process_time()
    accs = [finetune(model_dir, train, test, num_labels, seed, random_init, args.epochs, args.learning_rate)
            for seed in args.seeds]
    out = {"model": str(model_dir), "weights": "random" if random_init else "trained", "task": args.task,
           "train_examples": len(train), "test_examples": len(test), "seeds": args.seeds,
           "probe_accuracy": accs, "probe_accuracy_mean": statistics.mean(accs),
           "probe_accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
           "probe_cpu_s": round(time.process_time() - cpu, 1)}
    if args.pairs:
        out["minimal_pairs_accuracy"] = pairs_accuracy(model_dir, args.pairs, random_init)
    out["loadavg"] = os.getloadavg()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="exported model directories")
    p.add_argument("--pairs", type=Path, help="a minimal-pair file (scripts/make_minimal_pairs.py)")
    p.add_argument("--random", action="store_true", help="also score each network with random weights")
    p.add_argument("--task", choices=("order", "source"), default="order")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    p.add_argument("--per-corpus", type=int, default=250, help="sentences per corpus, train and test each")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for d in args.dirs:
        if not (d / "model.safetensors").is_file():
            print(f"error: {d} holds no export (model.safetensors): train it first", file=sys.stderr)
            return 1
    if args.pairs and not args.pairs.is_file():
        print(f"error: {args.pairs} is not a file", file=sys.stderr)
        return 1
    task_data = make_task(args.task, args.per_corpus)
    for d in args.dirs:
        for random_init in ((False, True) if args.random else (False,)):
            line = judge(d, args, task_data, random_init)
            assert all(math.isfinite(a) for a in line["probe_accuracy"])
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
