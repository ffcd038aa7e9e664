"""``bench_prepare.py --synthetic-gb G [G ...]``: sharded prepare at scale, one process against two.

The corpus: the shared corpora's lines (``--corpora-dir``, every ``*.txt.xz``), repeated and
shuffled (each repetition in a new seeded order) into ``--files`` text files until G GB.  A
repeated line costs the piece cache less than new text would, so MB/s here is an upper bound
on what fresh text of the same kind gives; what it measures well is how time and memory
grow with G.  The tokenizer is trained once on a 20 MB sample (vocabulary 8192).

Per G, measured in subprocesses one after the other:

* 1 process: ``mlmtool prepare DIR FILES --num-shards S --num-proc P --force --json``;
* 2 processes: the same with ``--shard-index`` halves (``--num-proc P/2`` each), started
  together, then the finishing call (a plain prepare, nothing left to tokenize).

Reported per run: wall seconds, CPU seconds, MB/s and tokens/s (input bytes and tokens /
wall), the sampled peak RSS of the process tree, and the store's fingerprint (the two ways
must agree).  Ends with one JSON line.
"""

from __future__ import annotations

import lzma
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from _bench_proc import format_machine, loadavg, machine_info, mlmtool_exe, print_json, run_measured


def make_corpus(src_dir: Path, out_dir: Path, gb: float, files: int, seed: int = 0) -> list[Path]:
    lines: list[bytes] = []
    for p in sorted(src_dir.glob("*.txt.xz")):
        lines += [x for x in lzma.decompress(p.read_bytes()).split(b"\n") if x.strip()]
    if not lines:
        raise SystemExit(f"no *.txt.xz corpora in {src_dir} (see --corpora-dir)")
    target = int(gb * 1e9)
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"part-{i:03d}.txt" for i in range(files)]
    handles = [open(p, "wb", buffering=1 << 22) for p in paths]
    written = 0
    try:
        while written < target:
            order = list(range(len(lines)))
            rng.shuffle(order)
            for j in range(0, len(order), 10_000):  # 10,000 lines at a time, to the files in turn
                chunk = b"\n".join(lines[i] for i in order[j:j + 10_000]) + b"\n"
                chunk = chunk[:max(0, target - written)]
                chunk = chunk[:chunk.rfind(b"\n") + 1] if written + len(chunk) >= target else chunk
                handles[(j // 10_000) % files].write(chunk)
                written += len(chunk)
                if written >= target or not chunk:
                    written = target
                    break
    finally:
        for h in handles:
            h.close()
    return paths


def _fingerprint(exe: str, model_dir: Path) -> dict:
    m = run_measured([exe, "info", str(model_dir), "--json"])
    return m.json_tail()["data"]["fingerprint"]


def run(args) -> None:
    info = machine_info("tokenizers")
    print(format_machine(info))
    exe = mlmtool_exe()
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_synthetic."))
    rows = []
    try:
        model = tmp / "model"
        base = make_corpus(Path(args.corpora_dir), tmp / "sample", 0.02, 1)
        run_measured([exe, "init", str(model), "--preset", "tiny"])
        run_measured([exe, "tokenizer", str(model), *map(str, base), "--vocab-size", "8192"])
        for gb in args.synthetic_gb:
            corpus_dir = tmp / f"corpus-{gb}"
            t = time.perf_counter()
            files = make_corpus(Path(args.corpora_dir), corpus_dir, gb, args.files)
            nbytes = sum(p.stat().st_size for p in files)
            print(f"G = {gb}: {nbytes / 1e6:.0f} MB in {len(files)} files (written in {time.perf_counter() - t:.0f} s)",
                  flush=True)
            common = ["prepare", str(model), *map(str, files), "--num-shards", str(args.num_shards), "--force",
                      "--json"]
            load0 = loadavg()
            one = run_measured([exe, *common, "--num-proc", str(args.num_proc)])
            out = one.json_tail()
            fp1 = _fingerprint(exe, model)
            rows.append(_row(gb, "1 process", one.summary(), nbytes, out["tokens"], load0, loadavg(), fp1))
            print(_fmt(rows[-1]), flush=True)

            shutil.rmtree(model / "data")
            half = args.num_shards // 2
            shares = [list(range(0, half)), list(range(half, args.num_shards))]
            results: list = [None, None]
            load0 = loadavg()
            t0 = time.perf_counter()

            def go(i: int) -> None:
                cmd = [exe, *common, "--num-proc", str(max(1, args.num_proc // 2))]
                for k in shares[i]:
                    cmd += ["--shard-index", str(k)]
                results[i] = run_measured(cmd)

            threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            finish = run_measured([exe, *common[:-2], "--json", "--num-proc", "1"])  # no --force: finishes
            wall = time.perf_counter() - t0
            fp2 = _fingerprint(exe, model)
            summary = {"wall_s": round(wall, 3),
                       "cpu_s": round(sum(r.cpu_s for r in results) + finish.cpu_s, 3),
                       "tree_peak_rss_mb": round(sum(r.tree_peak_rss_mb for r in results), 1),
                       "maxrss_mb": round(max(r.maxrss_mb for r in results), 1),
                       "finish_wall_s": round(finish.wall_s, 3)}
            rows.append(_row(gb, "2 processes", summary, nbytes, out["tokens"], load0, loadavg(), fp2))
            print(_fmt(rows[-1]), flush=True)
            rows[-1]["same_fingerprint"] = fp1 == fp2
            print(f"  same fingerprint as 1 process: {fp1 == fp2}", flush=True)
            shutil.rmtree(corpus_dir)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_json({"machine": info, "num_shards": args.num_shards, "num_proc": args.num_proc, "runs": rows})


def _row(gb, how, m, nbytes, tokens, load0, load1, fp) -> dict:
    return {"gb": gb, "how": how, **m, "mb_per_s": round(nbytes / 1e6 / m["wall_s"], 2),
            "tokens_per_s": round(tokens / m["wall_s"]), "bytes": nbytes, "tokens": tokens,
            "loadavg_before": load0, "loadavg_after": load1, "fingerprint_train": fp["train"][:16]}


def _fmt(r: dict) -> str:
    return (f"  {r['how']:<12} wall {r['wall_s']:8.1f} s  cpu {r['cpu_s']:8.1f} s  {r['mb_per_s']:6.2f} MB/s  "
            f"{r['tokens_per_s']:>9,} tokens/s  peak RSS {r['tree_peak_rss_mb']:7.0f} MB  "
            f"load {r['loadavg_before'][0]:.1f}->{r['loadavg_after'][0]:.1f}")
