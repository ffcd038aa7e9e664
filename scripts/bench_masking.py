"""What masking modes and document attention cost the training step, A/B in one process.

    python scripts/bench_masking.py                       # tiny, 32 x 128, float32, 5 rounds
    python scripts/bench_masking.py --preset small --rounds 7 --variants token,documents
    python scripts/bench_masking.py --hlo-out /tmp/off.hlo  # also write the off step's optimised HLO

Each variant is the project's real ``train_step`` set up and jitted as ``Trainer`` does it
(``step.build_training``, 1-device mesh, donated state), on the same random blocks: documents
of 20-120 tokens framed ``<s> ... </s>`` and packed end to end, as ``prepare`` writes them
(vocabulary 8192, 60% of the pieces starting a word).  Variants:

* ``token``: today's step (token masking, 15%, no document attention);
* ``documents``: the same with ``--document-attention`` (segment ids, dense [B, 1, L, L] mask);
* ``whole-word``, ``span``: the masking modes (slots from the measured spread, as Trainer sizes them);
* ``schedule``: token masking with a rate computed in the step (0.15 -> 0.1: the same slots).

The variants run in alternation, ``--steps`` timed steps each per round, ``--rounds`` rounds,
so a change in the machine's load hits all of them alike; the figure is the median step over
all rounds, with the CPU seconds per step and the load other processes put on the machine.
Ends with one JSON line.  ``--hlo-out`` writes the optimised HLO of the ``token`` step (op
metadata stripped), to diff against another checkout's: the same program cannot differ in speed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import OtherLoad, format_machine, machine_info, median, print_json  # noqa: E402
from bench_train import BOS, EOS, SPECIALS, VOCAB, build_bench_training, compiled_stepper  # noqa: E402

VARIANTS = ("token", "documents", "whole-word", "span", "schedule")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="alternation rounds (default 5)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--hlo-out", help="write the optimised HLO of the 'token' variant here")
    return p.parse_args(argv)


def packed_blocks(n: int, batch: int, seq_len: int, seed: int = 0):
    """``n`` int32 [batch, seq_len] arrays of packed ``<s> ... </s>`` documents (20-120 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        stream = []
        while len(stream) < batch * seq_len:
            stream += [BOS, *rng.integers(len(SPECIALS), VOCAB, int(rng.integers(18, 119))).tolist(), EOS]
        out.append(np.asarray(stream[:batch * seq_len], np.int32).reshape(batch, seq_len))
    return out


def program_text(compiled) -> str:
    """The optimised HLO without its debug information (source locations, stack frames)."""
    lines = [line for line in compiled.as_text().splitlines() if not re.match(r'\s*\d+ (\{|")', line)]
    text = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))
    return re.sub(r", stack_frame_id=\d+", "", text)


def build(variant: str, args, batches, table):
    from mlmtool.presets import build_config
    from mlmtool.training.train_config import TrainConfig

    masking = variant if variant in ("whole-word", "span") else "token"
    final = 0.1 if variant == "schedule" else None
    cfg = TrainConfig(per_device_train_batch_size=args.batch_size, max_steps=10_000, masking=masking,
                      mlm_probability=0.15, mlm_probability_final=final)
    config = build_config(args.preset, overrides=[f"vocab_size={VOCAB}"])
    # Trainer's set-up (step.build_training): whole-word and span slots from the blocks' measured spread
    _, training = build_bench_training(config, cfg, batches, word_boundaries=table if masking != "token" else None,
                                       document_attention=variant == "documents")
    one_step, compiled, _, _ = compiled_stepper(training, batches)
    return one_step, compiled, training.plan.prediction_slots


def main(argv=None) -> None:
    import numpy as np

    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    rng = np.random.default_rng(1)
    table = np.where(rng.random(VOCAB) < 0.6, 1, 0).astype(np.uint8)
    table[list(SPECIALS)] = 3
    batches = packed_blocks(4, args.batch_size, args.seq_len)
    print(format_machine(machine_info()))
    steps, slots = {}, {}
    for v in variants:
        t0 = time.perf_counter()
        steps[v], compiled, slots[v] = build(v, args, batches, table)
        for _ in range(2):  # warm-up
            steps[v]()
        print(f"{v:>10}: compiled and warmed up in {time.perf_counter() - t0:.1f} s ({slots[v]} slots)")
        if v == "token" and args.hlo_out:
            Path(args.hlo_out).write_text(program_text(compiled))
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    load0 = os.getloadavg()
    with OtherLoad() as other:
        for _ in range(args.rounds):
            for v in variants:
                for _ in range(args.steps):
                    t, c = time.perf_counter(), time.process_time()
                    steps[v]()
                    wall[v].append(time.perf_counter() - t)
                    cpu[v].append(time.process_time() - c)
    base = median(wall[variants[0]])
    record = {"preset": args.preset, "batch": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
              "steps": args.steps, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
              "other_load_cores": other.cores, "variants": {}}
    print(f"\n{args.preset}, {args.batch_size} x {args.seq_len}, {args.rounds} rounds x {args.steps} steps; "
          f"other processes kept {other.cores if other.cores is not None else float('nan'):.2f} cores busy; "
          f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'variant':>10}  {'median step':>11}  {'vs ' + variants[0]:>9}  {'cpu/step':>8}  {'slots':>5}")
    for v in variants:
        m = median(wall[v])
        print(f"{v:>10}  {m * 1e3:9.1f} ms  {m / base - 1:+8.1%}  {median(cpu[v]) * 1e3:6.0f} ms  {slots[v]:>5}")
        record["variants"][v] = {"step_s": m, "relative": m / base, "cpu_s_per_step": median(cpu[v]),
                                 "min_step_s": min(wall[v]), "slots": slots[v]}
    print_json(record)


if __name__ == "__main__":
    main()
