"""Corpus throughput of ``mlmtool prepare`` against the seed notebook's recipe, same run.

    python scripts/bench_prepare.py                        # Linux kernel docs (21 MB), 2 rounds
    python scripts/bench_prepare.py --corpus FILE --vocab-size 8192 --rounds 1

Set-up (not timed against anything): the corpus is decompressed into a temporary
directory, a model directory is made there with the real CLI (``mlmtool init DIR --preset
roberta-base`` and ``mlmtool tokenizer DIR CORPUS``, vocabulary ``--vocab-size``, default
the preset's 50265), and a 0.5x and a 2x corpus are written (the first half of the lines;
the file twice, one after the other).

Each round then runs, one after the other in subprocesses:

* ours, 0.5x: the first half of the corpus' lines, as below;
* ours, 1x: ``mlmtool prepare DIR CORPUS --num-proc N --force --json`` (the installed
  console script, imports included);
* the seed notebook (HF "Pre-Training a Transformers model on TPU with Flax/JAX"), 1x:
  ``load_dataset("text", ...)`` with its ``train[5%:]`` / ``train[:5%]`` splits,
  ``AutoTokenizer.from_pretrained(DIR)`` (the same tokenizer), ``map(tokenize_function,
  batched=True, num_proc=N, remove_columns=...)`` with ``return_special_tokens_mask=True``,
  then ``map(group_texts, batched=True, num_proc=N)`` with the notebook's ``group_texts``
  (``sum(examples[k], [])``, blocks of 128), a fresh datasets cache in the temp dir;
* ours, 2x: the same command on the doubled corpus.

For every run: wall time, CPU time (user + sys of the process and the workers it waited
for), the largest RSS of one process and the sampled peak of the process tree's summed RSS.
Reported: MB/s (corpus bytes / wall), the notebook/ours ratios of wall and CPU time (medians
over the rounds), the 1x/0.5x and 2x/1x ratios of our time and memory (the 0.5x -> 1x step
adds new text; the 2x file repeats it, which the piece cache makes cheaper than new text),
the tokens and blocks both produced (the notebook splits validation differently; the
token totals must agree), and the size on disk of the notebook's datasets cache against
ours (DIR/data).

Ends with one JSON line.  See docs/benchmarks.md ("Prepare") for results.
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

from _bench_proc import (add_corpus_argument, decompress, disk_usage, format_machine,  # noqa: E402
                         machine_info, median, mlmtool_exe, print_json, run_measured)

MAX_SEQ_LENGTH = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_argument(p)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default: roberta-base's 50265)")
    p.add_argument("--num-proc", type=int, default=2, help="processes for both (default 2)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (ours 0.5x, ours 1x, notebook, ours 2x) (default 2)")
    p.add_argument("--no-notebook", action="store_true", help="only our 1x / 2x runs")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--synthetic-gb", type=float, nargs="+", default=None, metavar="G",
                   help="instead: sharded prepare of G GB of generated text (the shared corpora repeated and "
                        "shuffled), 1 process against 2 (scripts/_bench_synthetic.py)")
    p.add_argument("--corpora-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "corpora"),
                   help="--synthetic-gb: the *.txt.xz corpora to repeat (default ../shared/corpora)")
    p.add_argument("--files", type=int, default=8, help="--synthetic-gb: text files to write (default 8)")
    p.add_argument("--num-shards", type=int, default=8, help="--synthetic-gb: --num-shards (default 8)")
    p.add_argument("--notebook-worker", help=argparse.SUPPRESS)  # internal: run the recipe once, print JSON
    return p.parse_args(argv)


# -- the seed notebook's recipe (run in a child process) ------------------------------------

def notebook_worker(spec: dict) -> dict:
    """The notebook's data preparation, as written there, on a local text file."""
    import resource

    def cpu() -> float:  # this process + the pool workers it has joined so far
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    from datasets import DatasetDict, load_dataset
    from transformers import AutoTokenizer

    t_import, c_import = time.perf_counter(), cpu()
    files, model_dir, num_proc = spec["files"], spec["model_dir"], spec["num_proc"]
    max_seq_length = spec["max_seq_length"]

    raw_dataset = DatasetDict()
    raw_dataset["train"] = load_dataset("text", data_files=files, split="train[5%:]")
    raw_dataset["validation"] = load_dataset("text", data_files=files, split="train[:5%]")
    t_load, c_load = time.perf_counter(), cpu()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized_datasets = raw_dataset.map(tokenize_function, batched=True, num_proc=num_proc,
                                         remove_columns=raw_dataset["train"].column_names)
    t_tok, c_tok = time.perf_counter(), cpu()

    def group_texts(examples):
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        total_length = (total_length // max_seq_length) * max_seq_length
        result = {
            k: [t[i: i + max_seq_length] for i in range(0, total_length, max_seq_length)]
            for k, t in concatenated_examples.items()
        }
        return result

    grouped = tokenized_datasets.map(group_texts, batched=True, num_proc=num_proc)
    t_group, c_group = time.perf_counter(), cpu()

    # Untimed: what came out.
    import pyarrow.compute as pc

    tokens = {s: int(pc.sum(pc.list_value_length(tokenized_datasets[s].data.column("input_ids"))).as_py() or 0)
              for s in tokenized_datasets}
    empty = {s: sum(1 for t in raw_dataset[s]["text"] if not t) for s in raw_dataset}
    first_block = grouped["validation"][0]["input_ids"] if len(grouped["validation"]) else []
    return {"seconds": {"import": t_import - t0, "load_dataset": t_load - t_import,
                        "tokenize": t_tok - t_load, "group_texts": t_group - t_tok,
                        "processing": t_group - t_import, "total": t_group - t0},
            "cpu_seconds": {"import": c_import - c0, "load_dataset": c_load - c_import,
                            "tokenize": c_tok - c_load, "group_texts": c_group - c_tok,
                            "processing": c_group - c_import, "total": c_group - c0},
            "rows": {s: len(raw_dataset[s]) for s in raw_dataset}, "empty_rows": empty,
            "tokens": tokens, "blocks": {s: len(grouped[s]) for s in grouped},
            "tokenizer_class": type(tokenizer).__name__, "first_validation_block_len": len(first_block)}


def run_notebook(args, corpus: Path, model_dir: Path, cache: Path):
    spec = {"files": str(corpus), "model_dir": str(model_dir), "num_proc": args.num_proc,
            "max_seq_length": MAX_SEQ_LENGTH}
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    m = run_measured([sys.executable, __file__, "--notebook-worker", json.dumps(spec)], env=env)
    return m, m.json_tail()


# -- ours -----------------------------------------------------------------------------------

def run_ours(args, corpus: Path, model_dir: Path):
    m = run_measured([mlmtool_exe(), "prepare", str(model_dir), str(corpus), "--num-proc",
                      str(args.num_proc), "--force", "--json"])
    return m, m.json_tail()


def setup(args, tmp: Path) -> dict:
    corpus = tmp / "corpus.txt"
    src = Path(args.corpus)
    t = time.perf_counter()
    decompress(src, corpus)
    half = tmp / "corpus_half.txt"  # the first half of the lines (by bytes): new text to 1x
    data = corpus.read_bytes()
    cut = data.find(b"\n", len(data) // 2) + 1 or len(data)
    half.write_bytes(data[:cut])
    del data
    double = tmp / "corpus_2x.txt"
    with open(double, "wb") as g:
        for _ in range(2):
            with open(corpus, "rb") as f:
                shutil.copyfileobj(f, g, 1 << 20)
    decompress_s = time.perf_counter() - t
    model_dir = tmp / "model"
    exe = mlmtool_exe()
    init = run_measured([exe, "init", str(model_dir), "--preset", "roberta-base"])
    cmd = [exe, "tokenizer", str(model_dir), str(corpus), "--json"]
    if args.vocab_size:
        cmd += ["--vocab-size", str(args.vocab_size)]
    tok = run_measured(cmd)
    return {"corpus": corpus, "double": double, "half": half, "model_dir": model_dir,
            "bytes": corpus.stat().st_size, "decompress_s": decompress_s,
            "init": init.summary(), "tokenizer": tok.summary(),
            "vocab_size": tok.json_tail()["vocab_size"]}


def fmt_row(name: str, m: dict, mb: float) -> str:
    return (f"{name:<14}{m['wall_s']:>8.2f}{m['cpu_s']:>8.2f}{mb / m['wall_s']:>8.2f}{mb / m['cpu_s']:>9.2f}"
            f"{m['maxrss_mb']:>9.0f}{m['tree_peak_rss_mb']:>10.0f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.notebook_worker:
        print(json.dumps(notebook_worker(json.loads(args.notebook_worker))))
        return
    if args.synthetic_gb:
        from _bench_synthetic import run

        run(args)
        return

    info = machine_info("tokenizers", "datasets", "transformers")
    print(format_machine(info))
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare."))
    try:
        s = setup(args, tmp)
        mb = s["bytes"] / 1e6
        print(f"corpus:  {args.corpus} -> {mb:.1f} MB; tokenizer vocab {s['vocab_size']:,} "
              f"(trained in {s['tokenizer']['wall_s']:.1f} s); num_proc {args.num_proc}; "
              f"{args.rounds} round(s)\n", flush=True)

        runs: dict[str, list] = {"ours_half": [], "ours_1x": [], "notebook_1x": [], "ours_2x": []}
        outputs: dict[str, dict] = {}
        cache_bytes = []
        ours_data_bytes = {}
        half_mb = s["half"].stat().st_size / 1e6
        for r in range(args.rounds):
            m, out = run_ours(args, s["half"], s["model_dir"])
            runs["ours_half"].append(m.summary() | {"internal_s": out["seconds"]})
            outputs["ours_half"] = out
            print(fmt_row(f"ours 0.5x #{r + 1}", runs["ours_half"][-1], half_mb), flush=True)
            m, out = run_ours(args, s["corpus"], s["model_dir"])
            runs["ours_1x"].append(m.summary() | {"internal_s": out["seconds"]})
            outputs["ours_1x"] = out
            ours_data_bytes["1x"] = disk_usage(s["model_dir"] / "data")
            print(fmt_row(f"ours 1x #{r + 1}", runs["ours_1x"][-1], mb), flush=True)
            if not args.no_notebook:
                cache = tmp / f"hf_cache_{r}"
                m, out = run_notebook(args, s["corpus"], s["model_dir"], cache)
                runs["notebook_1x"].append(m.summary() | {"stages_s": out["seconds"],
                                                          "stages_cpu_s": out["cpu_seconds"]})
                outputs["notebook_1x"] = out
                cache_bytes.append(disk_usage(cache))
                shutil.rmtree(cache, ignore_errors=True)
                print(fmt_row(f"notebook #{r + 1}", runs["notebook_1x"][-1], mb), flush=True)
            m, out = run_ours(args, s["double"], s["model_dir"])
            runs["ours_2x"].append(m.summary() | {"internal_s": out["seconds"]})
            outputs["ours_2x"] = out
            ours_data_bytes["2x"] = disk_usage(s["model_dir"] / "data")
            print(fmt_row(f"ours 2x #{r + 1}", runs["ours_2x"][-1], 2 * mb), flush=True)

        def med(name, key):
            return median([x[key] for x in runs[name]]) if runs[name] else None

        table = {name: {k: med(name, k) for k in ("wall_s", "cpu_s", "maxrss_mb", "tree_peak_rss_mb")}
                 for name in runs if runs[name]}
        for name in ("ours_half", "ours_1x", "ours_2x"):
            table[name]["internal_s"] = med(name, "internal_s")
        sizes = {"ours_half": half_mb, "ours_1x": mb, "notebook_1x": mb, "ours_2x": 2 * mb}
        print(f"\nmedians over {args.rounds} round(s); MB/s = corpus MB / seconds")
        print(f"{'':<14}{'wall s':>8}{'CPU s':>8}{'MB/s':>8}{'MB/CPU-s':>9}{'RSS MB':>9}{'tree MB':>10}")
        for name, row in table.items():
            print(fmt_row(name.replace("_", " ").replace("half", "0.5x"), row, sizes[name]))

        result = {"benchmark": "prepare", "machine": info, "loadavg_after": list(os.getloadavg()),
                  "corpus": args.corpus, "corpus_bytes": s["bytes"], "vocab_size": s["vocab_size"],
                  "num_proc": args.num_proc, "rounds": args.rounds, "runs": runs, "medians": table,
                  "setup": {k: s[k] for k in ("decompress_s", "init", "tokenizer")},
                  "ours_mb_per_s": mb / table["ours_1x"]["wall_s"],
                  "ours_mb_per_cpu_s": mb / table["ours_1x"]["cpu_s"],
                  "ours_internal_mb_per_s": mb / table["ours_1x"]["internal_s"],
                  "half_bytes": s["half"].stat().st_size,
                  "scaling_2x_over_1x": {k: table["ours_2x"][k] / table["ours_1x"][k]
                                         for k in ("wall_s", "cpu_s", "internal_s", "maxrss_mb",
                                                   "tree_peak_rss_mb")},
                  "scaling_1x_over_half": {k: table["ours_1x"][k] / table["ours_half"][k]
                                           for k in ("wall_s", "cpu_s", "internal_s", "maxrss_mb",
                                                     "tree_peak_rss_mb")},
                  "ours_output": {k: {f: v[f] for f in ("documents", "tokens", "blocks", "num_blocks",
                                                          "tokens_per_split", "dropped_tokens")}
                                  for k, v in outputs.items() if k.startswith("ours")},
                  "ours_data_bytes": ours_data_bytes}
        sc, sh = result["scaling_2x_over_1x"], result["scaling_1x_over_half"]
        print(f"\nours: {result['ours_mb_per_s']:.2f} MB/s wall end to end "
              f"({result['ours_internal_mb_per_s']:.2f} MB/s inside prepare, after the CLI's imports), "
              f"{result['ours_mb_per_cpu_s']:.2f} MB per CPU-second")
        for label, x in ((f"1x / 0.5x ({mb / half_mb:.2f}x the bytes, new text)", sh),
                         ("2x / 1x (the same text again: its second copy hits the piece cache)", sc)):
            print(f"ours {label}: wall {x['wall_s']:.2f}x, CPU {x['cpu_s']:.2f}x, internal "
                  f"{x['internal_s']:.2f}x; largest process RSS {x['maxrss_mb']:.2f}x, tree RSS "
                  f"{x['tree_peak_rss_mb']:.2f}x")
        if runs["notebook_1x"]:
            nb = table["notebook_1x"]
            nb_out = outputs["notebook_1x"]
            ours = table["ours_1x"]
            ours_out = outputs["ours_1x"]
            stages = {k: median([x["stages_s"][k] for x in runs["notebook_1x"]])
                      for k in runs["notebook_1x"][0]["stages_s"]}
            stages_cpu = {k: median([x["stages_cpu_s"][k] for x in runs["notebook_1x"]])
                          for k in runs["notebook_1x"][0]["stages_cpu_s"]}
            nb_tokens = sum(nb_out["tokens"].values())
            nb_empty = sum(nb_out["empty_rows"].values())
            result["notebook"] = {"stages_s": stages, "stages_cpu_s": stages_cpu, "output": nb_out,
                                  "cache_bytes": median(cache_bytes)}
            result["speedup"] = {
                "wall": nb["wall_s"] / ours["wall_s"],
                "cpu": nb["cpu_s"] / ours["cpu_s"],
                "processing_wall": stages["processing"] / ours["internal_s"],
                "target": 10.0,
            }
            # The notebook keeps empty lines as documents (<s></s>: 2 tokens each); we skip them.
            result["agreement"] = {
                "tokens_ours": ours_out["tokens"], "tokens_notebook": nb_tokens,
                "tokens_notebook_without_empty_rows": nb_tokens - 2 * nb_empty,
                "tokens_equal": ours_out["tokens"] == nb_tokens - 2 * nb_empty,
                "blocks_ours": ours_out["blocks"], "blocks_notebook": sum(nb_out["blocks"].values()),
            }
            result["disk"] = {"notebook_cache_bytes": median(cache_bytes),
                              "ours_data_bytes": ours_data_bytes["1x"],
                              "ratio": median(cache_bytes) / max(ours_data_bytes["1x"], 1)}
            sp, ag, dk = result["speedup"], result["agreement"], result["disk"]
            print("notebook stages (median wall / CPU s): " + ", ".join(
                f"{k} {stages[k]:.1f} / {stages_cpu[k]:.1f}"
                for k in ("import", "load_dataset", "tokenize", "group_texts")) + f" ({nb_out['tokenizer_class']})")
            print(f"speed-up over the notebook: wall {sp['wall']:.1f}x, CPU {sp['cpu']:.1f}x, "
                  f"processing only (no imports) {sp['processing_wall']:.1f}x  (target >= 10x: "
                  f"{'met' if min(sp['wall'], sp['cpu']) >= 10 else 'MISSED'})")
            print(f"tokens: ours {ag['tokens_ours']:,}, notebook {ag['tokens_notebook']:,} "
                  f"({'equal' if ag['tokens_equal'] else 'DIFFERENT'}"
                  f"{f', {nb_empty:,} empty rows discounted' if nb_empty else ''}); blocks of "
                  f"{MAX_SEQ_LENGTH}: ours {ag['blocks_ours']:,}, notebook {ag['blocks_notebook']:,}")
            print(f"on disk: notebook's datasets cache {dk['notebook_cache_bytes'] / 1e6:.1f} MB, ours "
                  f"(DIR/data) {dk['ours_data_bytes'] / 1e6:.1f} MB ({dk['ratio']:.1f}x smaller)")
        result["machine"]["loadavg_after"] = list(os.getloadavg())
        print_json(result)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
