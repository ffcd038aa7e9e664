"""Start-up cost of the ``mlmtool`` command line: ``--help`` and ``init``.

    python scripts/bench_cli.py                 # 10 x --help, 5 x init
    python scripts/bench_cli.py --runs 20 --init-runs 3

In subprocesses, through the installed console script, one after the other:

* ``python -c pass`` (the interpreter's own start-up, the floor), ``mlmtool --help``
  (target: median < 0.5 s wall) and ``mlmtool prepare --help``, ``--runs`` times each
  after one untimed warm-up (bytecode caches, page cache), interleaved;
* ``mlmtool init DIR --preset roberta-base`` into a fresh directory, ``--init-runs`` times.

Wall and CPU seconds (user + sys), medians.  Then which heavy libraries each path
imports: every subcommand's ``--help`` and ``init`` run in a child that reports the
``sys.modules`` entries of jax, flax, optax, transformers, torch, datasets, tokenizers and
numpy (``--help`` must import none of jax / transformers); and ``python -X importtime``
of ``--help`` and ``init``: the largest imports by cumulative time.

Ends with one JSON line.  See docs/benchmarks.md ("CLI start-up") for results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_proc import format_machine, machine_info, median, mlmtool_exe, print_json, run_measured  # noqa: E402

HEAVY = ("jax", "flax", "optax", "orbax", "transformers", "torch", "datasets", "tokenizers", "numpy",
         "pyarrow", "pandas")
FORBIDDEN_ON_HELP = ("jax", "transformers", "torch", "flax", "datasets")
TARGET_HELP_S = 0.5
SUBCOMMANDS = ("init", "tokenizer", "prepare", "train", "eval", "predict", "report", "info")

# Runs the CLI in-process (as the console script does) and prints the heavy modules loaded.
_PROBE = """
import json, sys
sys.argv = ["mlmtool"] + json.loads(sys.argv[1])
from mlmtool.cli import main
try:
    main()
except SystemExit:
    pass
heavy = %r
loaded = sorted(h for h in heavy if h in sys.modules)
sys.stdout.flush()
sys.__stdout__.write("\\n@@" + json.dumps(loaded) + "\\n")
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10, help="timed runs of each --help command (default 10)")
    p.add_argument("--init-runs", type=int, default=5, help="timed runs of init (default 5)")
    return p.parse_args(argv)


def probe_modules(cli_args: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,), json.dumps(cli_args)],
                         capture_output=True, text=True, env=dict(os.environ, COLUMNS="100"))
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise SystemExit(f"probe of {cli_args} failed: {out.stderr[-2000:]}")


def importtime(cli_args: list[str], top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """Total import time (s) of a run and its largest top-level imports by cumulative time."""
    out = subprocess.run([sys.executable, "-X", "importtime", mlmtool_exe(), *cli_args],
                         capture_output=True, text=True, env=dict(os.environ, COLUMNS="100"))
    rows = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((len(m.group(3)), m.group(4), int(m.group(2)) / 1e6))
    top_level = [(name, s) for depth, name, s in rows if depth == 1]
    total = sum(s for _, s in top_level)
    # the largest imports at any depth, without listing a package and its own parent twice
    biggest = sorted(((name, s) for depth, name, s in rows if depth <= 3), key=lambda x: -x[1])
    seen, picked = set(), []
    for name, s in biggest:
        root = name.split(".")[0]
        if root in seen:
            continue
        seen.add(root)
        picked.append((name, round(s, 3)))
        if len(picked) == top:
            break
    return total, picked


def main(argv=None) -> None:
    args = parse_args(argv)
    info = machine_info("typer", "click", "rich", "transformers", "jax", "torch")
    print(format_machine(info))
    exe = mlmtool_exe()
    env = dict(os.environ, COLUMNS="100")
    cmds = {"python -c pass": [sys.executable, "-c", "pass"],
            "mlmtool --help": [exe, "--help"],
            "mlmtool prepare --help": [exe, "prepare", "--help"]}
    for cmd in cmds.values():  # warm-up
        run_measured(cmd, env=env, sample_s=0.02)
    runs: dict[str, list[dict]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            runs[name].append(run_measured(cmd, env=env, sample_s=0.02).summary())

    tmp = Path(tempfile.mkdtemp(prefix="bench_cli."))
    try:
        runs["mlmtool init DIR --preset roberta-base"] = [
            run_measured([exe, "init", str(tmp / f"m{i}"), "--preset", "roberta-base"], env=env).summary()
            for i in range(args.init_runs)]
        init_modules = probe_modules(["init", str(tmp / "probe"), "--preset", "roberta-base"])
        init_imports = importtime(["init", str(tmp / "imptime"), "--preset", "roberta-base"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {name: {k: median([r[k] for r in rows]) for k in ("wall_s", "cpu_s", "maxrss_mb")}
           | {"min_wall_s": min(r["wall_s"] for r in rows), "max_wall_s": max(r["wall_s"] for r in rows)}
           for name, rows in runs.items()}
    print(f"\nmedians of {args.runs} runs (init: {args.init_runs})")
    print(f"{'':<40}{'wall s':>8}{'min':>7}{'max':>7}{'CPU s':>8}{'RSS MB':>8}")
    for name, row in med.items():
        print(f"{name:<40}{row['wall_s']:>8.3f}{row['min_wall_s']:>7.3f}{row['max_wall_s']:>7.3f}"
              f"{row['cpu_s']:>8.3f}{row['maxrss_mb']:>8.0f}")

    modules = {"--help": probe_modules(["--help"])}
    for sub in SUBCOMMANDS:
        modules[f"{sub} --help"] = probe_modules([sub, "--help"])
    modules["init DIR --preset roberta-base"] = init_modules
    bad = {k: [m for m in v if m in FORBIDDEN_ON_HELP] for k, v in modules.items() if k.endswith("--help")}
    bad = {k: v for k, v in bad.items() if v}
    print("\nheavy modules imported:")
    for k, v in modules.items():
        print(f"  mlmtool {k:<32} {', '.join(v) or '-'}")
    help_total, help_top = importtime(["--help"])
    print(f"\nimport time of --help (-X importtime, top-level total {help_total:.3f} s): "
          + ", ".join(f"{n} {s:.3f}" for n, s in help_top))
    print(f"import time of init (top-level total {init_imports[0]:.3f} s): "
          + ", ".join(f"{n} {s:.3f}" for n, s in init_imports[1]))
    h = med["mlmtool --help"]
    verdict = "met" if h["wall_s"] < TARGET_HELP_S else f"MISSED by {h['wall_s'] - TARGET_HELP_S:.3f} s"
    print(f"\nmlmtool --help: median {h['wall_s']:.3f} s wall, {h['cpu_s']:.3f} s CPU (target < "
          f"{TARGET_HELP_S} s: {verdict}); interpreter alone {med['python -c pass']['wall_s']:.3f} s; "
          f"no jax/transformers on any --help path: {'yes' if not bad else 'NO: ' + json.dumps(bad)}")
    info["loadavg_after"] = list(os.getloadavg())
    print_json({"benchmark": "cli", "machine": info, "runs": runs, "medians": med,
                "target_help_s": TARGET_HELP_S, "help_target_met": h["wall_s"] < TARGET_HELP_S,
                "heavy_modules": modules, "forbidden_on_help": bad,
                "importtime_help": {"total_s": help_total, "top": help_top},
                "importtime_init": {"total_s": init_imports[0], "top": init_imports[1]}})


if __name__ == "__main__":
    main()
