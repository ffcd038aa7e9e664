"""ModernBERT's training step, side by side: mlmtool against transformers (eager and torch.compile).

    python scripts/bench_modernbert.py                              # modernbert-small, seq 512 and 1024
    python scripts/bench_modernbert.py --seq-lens 512 --steps 3 --set num_hidden_layers=3
    python scripts/bench_modernbert.py --variants "local_attention=blockwise;local_attention=dense" --no-torch

For each sequence length, on the same random blocks (``<s>`` ... ``</s>``, no padding):

* **ours**: the project's real ``train_step`` (on-device masking at the ``TrainConfig``
  defaults, forward, backward, clipping, AdamW), jitted as ``Trainer`` jits it on a 1-device
  mesh; one compiled step per ``--variants`` entry (an ``MLMTOOL_KERNELS`` string, e.g. the
  dense windowed attention against the blockwise one, for A/Bs in one process);
* **transformers**' ``ModernBertForMaskedLM`` (its default attention) with fused
  ``torch.optim.AdamW`` (HF Trainer's parameter groups: no decay on biases and LayerNorm
  weights), clipping at 1.0, ``DataCollatorForLanguageModeling``'s masking inside the step
  and its loss over all positions; ``eager`` and ``compile`` (``torch.compile`` of the model,
  default mode).  Each runs in a child process of its own (no thread pool competes with
  another), kept alive between rounds.

The timed steps alternate in rounds (ours, then each peer, ``--steps`` per round), so a
change in the shared machine's load hits every side alike.  Reported per side: the median
wall and process-CPU seconds per step, tokens/s, compilation (the first call, for
torch.compile the warm-up steps), and the ratios ours / peer of tokens per wall second and
per CPU second; ``/proc/loadavg`` before and after.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import machine_info, median, print_json  # noqa: E402
from bench_train import (VOCAB, build_bench_training, compiled_stepper, random_batches, timed_steps,  # noqa: E402
                         torch_mlm_mask)
PEERS = ("eager", "compile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="modernbert-small", help="a ModernBERT preset (default modernbert-small)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, as 'mlmtool init --set' (e.g. hidden_size=384, local_attention=64)")
    p.add_argument("--seq-lens", default="512,1024", help="comma-separated sequence lengths (default 512,1024)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation (default 1)")
    p.add_argument("--peers", default="eager,compile", help="transformers modes: eager,compile (default both)")
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    p.add_argument("--variants", default="",
                   help="';'-separated MLMTOOL_KERNELS strings, one compiled step of ours each (default: the "
                        "backend's kernels)")
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)  # internal: one peer, driven over stdin
    return p.parse_args(argv)


def model_config(args) -> dict:
    from mlmtool.presets import build_config

    return build_config(args.preset, overrides=[f"vocab_size={VOCAB}", *args.set])


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()
    except OSError:
        return "?"


# -- ours ----------------------------------------------------------------------------------

def jax_stepper(config: dict, batch_size: int, batches, kernels: str):
    """Trainer's compiled step for ``config`` with MLMTOOL_KERNELS=``kernels``; returns
    (one_step, compile_s, last loss getter)."""
    import jax

    from mlmtool.runtime.kernels import ENV
    from mlmtool.training.train_config import TrainConfig

    os.environ[ENV] = kernels  # read when the model is built
    cfg = TrainConfig(per_device_train_batch_size=batch_size, max_steps=10_000)
    _, training = build_bench_training(config, cfg, batches)  # Trainer's set-up (step.build_training)
    one_step, compiled, compile_s, box = compiled_stepper(training, batches)

    def loss():
        m = jax.device_get(box["metrics"])
        return float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)

    os.environ.pop(ENV, None)
    one_step.compiled = compiled  # for a profile's HLO names
    return one_step, compile_s, loss


# -- transformers --------------------------------------------------------------------------

def hf_modernbert(config: dict):
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("architectures", "dtype")}
    return transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**fields))


def trainer_adamw(model):
    """HF Trainer's AdamW (fused) and groups: no weight decay on biases and LayerNorm weights."""
    import torch

    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        (no_decay if name.endswith("bias") or module in norms else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=5e-5, betas=(0.9, 0.98), eps=1e-8, fused=True)


def torch_worker(spec: dict) -> None:
    """One peer: build, compile/warm up, print {"ready"}; then per stdin line N, N timed steps."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = hf_modernbert(spec["config"])
    model.train()
    opt = trainer_adamw(model)
    forward = torch.compile(model) if spec["mode"] == "compile" else model
    batches = [torch.as_tensor(b, dtype=torch.long)
               for b in random_batches(4, spec["batch_size"], spec["seq_len"], vocab=VOCAB)]
    gen = torch.Generator().manual_seed(0)
    attention_mask = torch.ones_like(batches[0])
    box = {"i": 0, "loss": None}

    def one_step():
        inputs, labels = torch_mlm_mask(batches[box["i"] % len(batches)], gen, VOCAB)
        loss = forward(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        box["i"] += 1
        box["loss"] = float(loss)

    t0 = time.perf_counter()
    one_step()  # torch.compile compiles here (forward and backward)
    compile_s = time.perf_counter() - t0
    timed_steps(one_step, spec["warmup"], 0)
    print(json.dumps({"ready": True, "compile_s": compile_s,
                      "attn_implementation": model.config._attn_implementation}), flush=True)
    for line in sys.stdin:
        if not line.strip() or line.strip() == "quit":
            break
        wall, cpu = timed_steps(one_step, 0, int(line))
        print(json.dumps({"wall": wall, "cpu": cpu, "loss": box["loss"]}), flush=True)


class Peer:
    """A torch_worker child process, driven a round at a time."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--torch-worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers worker exited ({self.proc.wait()})")
        return json.loads(line)

    def steps(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


# -- main ----------------------------------------------------------------------------------

def bench_length(args, config: dict, seq_len: int, threads: int) -> dict:
    batches = random_batches(4, args.batch_size, seq_len, vocab=VOCAB)
    sides: dict[str, dict] = {}
    runners = {}
    for variant in args.variants.split(";"):
        name = "ours" + (f"[{variant}]" if variant else "")
        one_step, compile_s, loss = jax_stepper(config, args.batch_size, batches, variant)
        timed_steps(one_step, args.warmup, 0)
        sides[name] = {"compile_s": compile_s, "wall": [], "cpu": []}
        runners[name] = ("jax", one_step, loss)
    peers = [] if args.no_torch else [p.strip() for p in args.peers.split(",") if p.strip()]
    for mode in peers:
        spec = {"config": config, "mode": mode, "batch_size": args.batch_size, "seq_len": seq_len,
                "warmup": args.warmup, "threads": threads}
        peer = Peer(spec)
        sides[f"hf_{mode}"] = {"compile_s": peer.info["compile_s"], "wall": [], "cpu": [],
                               "attn_implementation": peer.info["attn_implementation"]}
        runners[f"hf_{mode}"] = ("torch", peer, None)
    load_before = loadavg()
    for _ in range(args.rounds):
        for name, (kind, runner, loss) in runners.items():
            if kind == "jax":
                wall, cpu = timed_steps(runner, 0, args.steps)
                sides[name]["loss_last"] = loss()
            else:
                out = runner.steps(args.steps)
                wall, cpu = out["wall"], out["cpu"]
                sides[name]["loss_last"] = out["loss"]
            sides[name]["wall"] += wall
            sides[name]["cpu"] += cpu
    for kind, runner, _ in runners.values():
        if kind == "torch":
            runner.close()
    tokens = args.batch_size * seq_len
    for side in sides.values():
        side["step_s"], side["cpu_s_per_step"] = median(side.pop("wall")), median(side.pop("cpu"))
        side["tokens_per_s"] = tokens / side["step_s"]
        side["tokens_per_cpu_s"] = tokens / side["cpu_s_per_step"]
    ours = next(iter(sides))
    ratios = {}
    for name, side in sides.items():
        if name != ours:
            ratios[f"{ours}/{name}"] = {"wall": sides[ours]["tokens_per_s"] / side["tokens_per_s"],
                                        "cpu": sides[ours]["tokens_per_cpu_s"] / side["tokens_per_cpu_s"]}
    return {"sides": sides, "ratios": ratios, "loadavg_before": load_before, "loadavg_after": loadavg()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(json.loads(args.torch_worker))
        return
    info = machine_info()
    config = model_config(args)
    print(f"{args.preset} {' '.join(args.set)}: {config['num_hidden_layers']} layers x {config['hidden_size']}, "
          f"window {config['local_attention']}; batch {args.batch_size}; {args.rounds} rounds x {args.steps} "
          f"steps per side; {info['cores']} cores; loadavg {loadavg()}")
    results = {}
    for seq_len in [int(s) for s in args.seq_lens.split(",") if s.strip()]:
        r = results[seq_len] = bench_length(args, config, seq_len, info["cores"])
        for name, side in r["sides"].items():
            print(f"  seq {seq_len:5d} {name:<40} {side['tokens_per_s']:9,.0f} tok/s  {side['step_s']:6.2f} s/step "
                  f"{side['cpu_s_per_step']:6.2f} CPU s/step  compile {side['compile_s']:6.1f} s  "
                  f"loss {side['loss_last']:.3f}", flush=True)
        for pair, ratio in r["ratios"].items():
            print(f"  seq {seq_len:5d} {pair}: {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU "
                  f"(loadavg {r['loadavg_before']} -> {r['loadavg_after']})", flush=True)
    print_json({"benchmark": "modernbert_train", "preset": args.preset, "overrides": args.set,
                "batch_size": args.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
                "machine": info, "ratios": {str(k): v["ratios"] for k, v in results.items()},
                "results": {str(k): v for k, v in results.items()}})


if __name__ == "__main__":
    main()
