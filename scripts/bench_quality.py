#!/usr/bin/env python
"""Judge exported models by what they can do: a fine-tuning probe and minimal pairs.

    python scripts/bench_quality.py DIR... [--pairs FILE] [--random] [--task source|order]
        [--probe linear|finetune] [--seeds 0,1,2]

For each model directory (an export: model.safetensors + tokenizer), one JSON line:

* **probe**: a classifier on a task built from real sentences of the four corpora in
  ``../shared/corpora`` (Austen, Brown, the King James Bible, the Linux kernel docs), then its
  accuracy on held-out sentences, over three seeds: ``probe_accuracy_mean``,
  ``probe_accuracy_sd`` and each seed's.  ``--probe``:

  - ``linear`` (default): logistic regression on **frozen** features (each layer's hidden
    states mean-pooled over the sentence, concatenated; SentEval's design); the seed draws
    which half of the training sentences it sees (and, for ``--random``, the weights).  It
    measures what the encoder's representations hold, deterministically and in seconds.
  - ``finetune``: ``AutoModelForSequenceClassification`` fine-tuned with transformers'
    ``Trainer`` (PyTorch, CPU); the seed draws the new head, dropout and the data order.  On
    tiny, briefly trained models it is noisier than the effect it should show (seeds spread by
    0.15, some collapse to one class; docs/benchmarks.md): its head reads the first token,
    which masked-LM pre-training never trains.

  The tasks (``--task``):

  - ``source`` (default): which of the four corpora the sentence comes from (4 classes,
    balanced).
  - ``order``: is the sentence as written, or are two adjacent words swapped
    (``scripts/make_minimal_pairs.py``'s swap, at a place the sentence's hash picks)?  Binary;
    nothing in a bag of tokens tells the two apart, so it needs a model that knows word order
    (the tiny 250-step models of docs/benchmarks.md score chance, trained or random).

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


def features(model_dir: Path, examples, seed: int, random_init: bool):
    """Frozen features: each layer's hidden states (the embeddings' included), mean-pooled over
    the sentence's tokens, concatenated (SentEval's design; no weight is trained)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = (AutoModel.from_config(AutoConfig.from_pretrained(str(model_dir))) if random_init
             else AutoModel.from_pretrained(str(model_dir))).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            batch = tok([t for t, _ in examples[i:i + 64]], truncation=True, max_length=64, padding=True,
                        return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.cat([(h * mask).sum(1) / mask.sum(1) for h in hidden], -1))
    return torch.cat(out).double()


def linear_probe(model_dir: Path, train, test, num_labels: int, seed: int, random_init: bool) -> float:
    """Logistic regression (L-BFGS, L2 1e-2, standardised features) on frozen features of half
    the training examples (the seed draws which half, and for ``--random`` the weights)."""
    import numpy as np
    import torch

    keep = np.random.default_rng(seed).permutation(len(train))[:len(train) // 2]
    sub = [train[i] for i in sorted(keep)]
    x_train, x_test = features(model_dir, sub, seed, random_init), features(model_dir, test, seed, random_init)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    y_train = torch.tensor([y for _, y in sub])
    w = torch.zeros(x_train.shape[1], num_labels, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x_train @ w + b, y_train) + 1e-2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ w + b).argmax(-1).numpy()
    return float(np.mean(pred == np.array([y for _, y in test])))


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
    if args.probe == "linear":
        accs = [linear_probe(model_dir, train, test, num_labels, seed, random_init) for seed in args.seeds]
    else:
        accs = [finetune(model_dir, train, test, num_labels, seed, random_init, args.epochs, args.learning_rate)
                for seed in args.seeds]
    out = {"model": str(model_dir), "weights": "random" if random_init else "trained", "task": args.task,
           "probe": args.probe,
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
    p.add_argument("--task", choices=("source", "order"), default="source")
    p.add_argument("--probe", choices=("linear", "finetune"), default="linear",
                   help="logistic regression on frozen features (default), or fine-tuning with Trainer")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds (default 0,1,2)")
    p.add_argument("--per-corpus", type=int, default=250, help="sentences per corpus, train and test each")
    p.add_argument("--epochs", type=float, default=3.0, help="--probe finetune only")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="--probe finetune only")
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
