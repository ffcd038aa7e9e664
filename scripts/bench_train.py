"""Train-step throughput of mlmtool against the machine's matmul peak and against PyTorch.

    python scripts/bench_train.py                       # tiny + small, 32 x 128, float32
    python scripts/bench_train.py --presets small --steps 20 --no-torch
    python scripts/bench_train.py --presets small --no-torch --profile /tmp/trace   # where the time goes

For each preset (vocabulary 8192) it times the project's real ``train_step`` (on-device
masking, forward, backward, global-norm clipping and AdamW with the ``TrainConfig``
defaults), set up by ``Trainer``'s ``step.build_training`` (the same plan, shardings and
state donation) on a 1-device mesh, on random token rows that start with ``<s>`` and end with ``</s>`` (no padding).
Every timed step is fully synchronised (``block_until_ready`` on the new state and the
metrics); the figure is the median over ``--steps`` steps after compilation and warm-up.

In the same run:

* the matmul peak: ``jnp.dot`` of two 2048 x 2048 float32 matrices (median of 7), the
  ceiling the model-FLOPs utilisation (MFU) is quoted against;
* two FLOP counts per step (forward + backward = 3 x forward, as nanoGPT's ``estimate_mfu``):
  - model FLOPs (full head): ``6 N + 12 layers hidden seq_len`` per token, ``N`` the
    parameters without the position/token-type tables (the tied word embedding counts
    once, as the decoder): the MLM head on every position, as Hugging Face computes it;
  - executed FLOPs: the same, but the MLM head (dense + decoder) only on the prediction
    slots our step really computes (MosaicBERT-style; mean + 5 sd of the masked count);
* transformers ``RobertaForMaskedLM`` (PyTorch, same sizes and dropout, the attention
  transformers picks by default) with ``torch.optim.AdamW`` (fused: HF Trainer's default
  optimizer for torch >= 2.8; same betas, eps, weight decay and no-decay groups), gradient
  clipping at 1.0, ``DataCollatorForLanguageModeling`` masking (its ``torch_mask_tokens``,
  inside the timed step) and HF's loss over all positions, on the same batches, with
  ``torch.set_num_threads(cores)``.  It runs in a child process so that neither library's
  thread pool competes with the other's.

The CPU time per step (all threads) is printed too: on a shared machine it moves much less
than wall time, and cpu / wall shows how busy the cores were.  Ends with one JSON line.
See docs/benchmarks.md for results and what limits them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import OtherLoad, format_machine, machine_info, matmul_peak, median, print_json, si  # noqa: E402

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4  # RoBERTa's special ids (the presets' tokenizer layout)
SPECIALS = (BOS, PAD, EOS, UNK, MASK)
VOCAB = 8192


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets (default: tiny,small)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step (default 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="computation dtype of our step (PyTorch always runs float32)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-matmul probe (default 2048)")
    p.add_argument("--profile", metavar="DIR",
                   help="also trace 3 more steps of ours with jax.profiler into DIR (TensorBoard/XProf "
                        "format) and print where the step's time goes, grouped by HLO op_name")
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)  # internal: run one PyTorch config, print JSON
    return p.parse_args(argv)


def model_config(preset: str) -> dict:
    from mlmtool.presets import build_config

    return build_config(preset, overrides=[f"vocab_size={VOCAB}"])


def random_batches(n: int, batch: int, seq_len: int, seed: int = 0, vocab: int = VOCAB):
    """``n`` int32 arrays [batch, seq_len]: ``<s>``, ids uniform over the non-special vocabulary, ``</s>``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(len(SPECIALS), vocab, (batch, seq_len), dtype=np.int32)
        ids[:, 0], ids[:, -1] = BOS, EOS
        out.append(ids)
    return out


def timed_steps(step, n_warmup: int, n_timed: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``n_timed`` calls of ``step()`` after ``n_warmup``."""
    wall, cpu = [], []
    for i in range(n_warmup + n_timed):
        t, c = time.perf_counter(), time.process_time()
        step()
        if i >= n_warmup:
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    return wall, cpu


def summarise(wall: list[float], cpu: list[float], tokens: int) -> dict:
    sec = median(wall)
    return {"step_s": sec, "steps_per_s": 1.0 / sec, "tokens_per_s": tokens / sec, "min_step_s": min(wall),
            "max_step_s": max(wall), "cpu_s_per_step": median(cpu)}


# -- FLOPs ---------------------------------------------------------------------------------

def flops_per_step(config: dict, batch: int, seq_len: int, head_rows: int) -> dict:
    """Training FLOPs of one step (``mlmtool.training.flops``: forward + backward = 3 x forward)."""
    from mlmtool.training.flops import matmul_parameters, training_flops_per_token

    tokens = batch * seq_len
    per_token = training_flops_per_token(config, seq_len, head_fraction=head_rows / tokens)
    return {"n_params_mfu": sum(matmul_parameters(config)), "head_rows": head_rows,
            "model_flops": per_token["model"] * tokens, "executed_flops": per_token["executed"] * tokens}


# -- ours ----------------------------------------------------------------------------------

class ArrayStore:
    """Rows in memory with what ``step.build_training`` reads of a ``BlockStore``: the
    presets' special ids (RoBERTa's), ``<s>`` starting each document."""

    def __init__(self, batches, vocab_size: int = VOCAB):
        import numpy as np

        self.rows = np.concatenate(batches)
        self.seq_len = self.rows.shape[1]
        self.pad_token_id, self.mask_token_id, self.special_token_ids = PAD, MASK, SPECIALS
        self.vocab_size, self.line_by_line, self.meta = vocab_size, False, {"cls_token_id": BOS}
        self.has_starts = True  # documents start at each <s> (read_documents), as prepare records them

    def read_documents(self, indices):
        """Rows and where their documents start (a ``BlockStore``'s record)."""
        rows = self.rows[indices]
        return rows, rows == BOS

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices):
        return self.rows[indices]


def build_bench_training(config: dict, cfg, batches, *, vocab_size: int = VOCAB, word_boundaries=None,
                         document_attention: bool = False):
    """(LoadedModel, step.Training) of ``config`` as ``Trainer`` builds them, on ``batches``
    (int32 [rows, seq_len] arrays) over a 1-device mesh."""
    import jax

    from mlmtool.runtime import sharding as sh
    from mlmtool.training.step import build_model, build_training

    loaded = build_model(config, cfg)
    mesh = sh.make_mesh(None, devices=jax.devices()[:1])
    training = build_training(loaded, cfg, ArrayStore(batches, vocab_size), mesh, word_boundaries=word_boundaries,
                              document_attention=document_attention)
    return loaded, training


def compiled_stepper(training, batches, rng=None):
    """``training``'s step compiled for ``batches`` from a fresh state, and ``one_step()``,
    which runs it once on the next batch, fully synchronised: (one_step, compiled, compile
    seconds, box); ``box["metrics"]`` holds the last step's metrics."""
    import jax

    rng = jax.random.PRNGKey(0) if rng is None else rng
    state = training.init_state(jax.random.PRNGKey(0))
    documents = training.step_kwargs["documents"]  # the batches carry their document starts (ids == <s>)
    device_batches = [jax.device_put((b[None], b[None] == BOS) if documents else b[None], training.batch_sharding)
                      for b in batches]
    t0 = time.perf_counter()
    compiled = training.step.lower(state, device_batches[0], rng).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "i": 0, "metrics": None}

    def one_step():
        box["state"], box["metrics"] = compiled(box["state"], device_batches[box["i"] % len(device_batches)], rng)
        jax.block_until_ready((box["state"], box["metrics"]))
        box["i"] += 1

    return one_step, compiled, compile_s, box


def bench_jax(preset: str, args: argparse.Namespace, batches) -> dict:
    import jax

    from mlmtool.training.train_config import TrainConfig

    cfg = TrainConfig(per_device_train_batch_size=args.batch_size, dtype=args.dtype, max_steps=10_000)
    # Exactly Trainer's set-up and jit (step.build_training) on a 1-device mesh.
    _, training = build_bench_training(model_config(preset), cfg, batches)
    plan = training.plan
    head_rows = args.batch_size // plan.rows_per_group * plan.prediction_slots
    one_step, compiled, compile_s, box = compiled_stepper(training, batches)
    try:
        xla_flops = float(compiled.cost_analysis().get("flops", float("nan")))
    except Exception:  # cost analysis is best-effort across jax versions
        xla_flops = float("nan")

    wall, cpu = timed_steps(one_step, args.warmup, args.steps)
    m = jax.device_get(box["metrics"])
    if args.profile:
        print_profile(f"{args.profile}/{preset}", compiled, one_step)
    return {**summarise(wall, cpu, args.batch_size * args.seq_len), "compile_s": compile_s, "xla_flops": xla_flops,
            "head_rows": head_rows, "prediction_slots": plan.prediction_slots,
            "rows_per_group": plan.rows_per_group,
            "loss_last": float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)}


PROFILE_GROUPS = (  # (label, regular expression on the op_name), first match wins
    ("attention matmuls (scores, context)", r"bqnd|bknd|bnqk"),
    ("dense matmuls (projections, FFN, MLM head)", r"dot_general"),
    ("LayerNorm", r"LayerNorm|layer_norm"),
    ("dropout", r"[Dd]ropout"),
    ("attention softmax, mask, transposes", r"attention/self/"),
    ("activation (GELU)", r"intermediate/"),
    ("loss over the head slots", r"^jit\(train_step\)/(transpose\()?jvp\((jit\(\w*\))?\)"),
)


def print_profile(trace_dir: str, compiled, one_step, n: int = 3) -> None:
    """Trace ``n`` steps and print op time per step by PROFILE_GROUPS (all threads summed)."""
    import collections
    import glob
    import re

    import jax

    op_names = dict(re.findall(r'^\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]*)"', compiled.as_text(), re.M))
    with jax.profiler.trace(trace_dir):
        for _ in range(n):
            one_step()
    xplane = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=lambda f: Path(f).stat().st_mtime)[-1]
    per_group = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xplane).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in op_names or ev.name.split(".")[0] in ("ynn_fusion", "dot", "sort", "while", "copy"):
                    op = op_names.get(ev.name, "")
                    group = next((g for g, rx in PROFILE_GROUPS if re.search(rx, op)), "other")
                    per_group[group] += ev.duration_ns / 1e6 / n
    total = sum(per_group.values())
    print(f"  profile ({trace_dir}): {total:.0f} ms of op time per step")
    for group, ms in per_group.most_common():
        print(f"    {ms:7.1f} ms  {100 * ms / total:4.1f}%  {group}")


# -- PyTorch -------------------------------------------------------------------------------

def hf_roberta_config(c: dict):
    """transformers' RobertaConfig with the sizes and dropouts of our config.json ``c``."""
    import transformers

    return transformers.RobertaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        hidden_act=c["hidden_act"], hidden_dropout_prob=c["hidden_dropout_prob"],
        attention_probs_dropout_prob=c["attention_probs_dropout_prob"],
        max_position_embeddings=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
        layer_norm_eps=c["layer_norm_eps"], initializer_range=c["initializer_range"],
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def torch_adamw(model, fused: bool = True):
    """HF Trainer's AdamW (fused, its default for torch >= 2.8) with its parameter groups (no
    weight decay on biases and LayerNorm weights) and our TrainConfig's betas, eps, decay."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=5e-5, betas=(0.9, 0.98), eps=1e-8, fused=fused)


def torch_mlm_mask(inputs, generator, vocab: int):
    """DataCollatorForLanguageModeling.torch_mask_tokens on ``inputs``' device: 15% of the
    non-special tokens; of those 80% <mask>, 10% a random token, 10% kept; labels -100 elsewhere."""
    import torch

    dev = inputs.device
    inputs, labels = inputs.clone(), inputs.clone()
    prob = torch.full(labels.shape, 0.15, device=dev)
    prob.masked_fill_(torch.isin(labels, torch.as_tensor(SPECIALS, device=dev)), 0.0)
    masked = torch.bernoulli(prob, generator=generator).bool()
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, 0.8, device=dev), generator=generator).bool() & masked
    inputs[replaced] = MASK
    rand = torch.bernoulli(torch.full(labels.shape, 0.5, device=dev), generator=generator).bool() & masked & ~replaced
    inputs[rand] = torch.randint(vocab, labels.shape, dtype=torch.long, generator=generator, device=dev)[rand]
    return inputs, labels


def torch_worker(spec: dict) -> dict:
    """One PyTorch configuration (run in a child process): HF RobertaForMaskedLM + AdamW."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(hf_roberta_config(spec["config"]))
    model.train()
    opt = torch_adamw(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / 10_000))
    batches = [torch.as_tensor(b, dtype=torch.long)
               for b in random_batches(spec["n_batches"], spec["batch_size"], spec["seq_len"])]
    gen = torch.Generator().manual_seed(0)
    attention_mask = torch.ones_like(batches[0])
    box = {"i": 0, "loss": None}

    def one_step():
        inputs, labels = torch_mlm_mask(batches[box["i"] % len(batches)], gen, VOCAB)
        loss = model(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss  # mean over masked
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        box["i"] += 1
        box["loss"] = float(loss)

    wall, cpu = timed_steps(one_step, spec["warmup"], spec["steps"])
    return {**summarise(wall, cpu, spec["batch_size"] * spec["seq_len"]),
            "attn_implementation": model.config._attn_implementation, "threads": torch.get_num_threads(),
            "loss_last": box["loss"]}


def bench_torch(preset: str, args: argparse.Namespace, threads: int) -> dict:
    spec = {"config": model_config(preset), "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps, "warmup": args.warmup, "threads": threads, "n_batches": 4}
    out = subprocess.run([sys.executable, __file__, "--torch-worker", json.dumps(spec)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ----------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))))
        return

    info = machine_info()
    print(format_machine(info))
    with OtherLoad() as other:
        results, peak = run_all(args, info)
    if other.cores is not None:
        print(f"other processes kept {other.cores:.2f} of {info['cores']} cores busy during the run"
              + (" (timings are pessimistic)" if other.cores > 0.1 * info["cores"] else ""))
    print_json({"benchmark": "train", "machine": info, "other_load_cores": other.cores,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype, "steps": args.steps,
                "matmul_peak_flops": peak["flops_median"], "matmul_peak_best_flops": peak["flops_best"],
                "matmul_n": args.matmul_n, "results": results})


def run_all(args: argparse.Namespace, info: dict) -> tuple[dict, dict]:
    peak = matmul_peak(args.matmul_n)
    print(f"matmul peak (jnp.dot {args.matmul_n}x{args.matmul_n} float32): {si(peak['flops_median'], 'FLOP/s')} "
          f"median, {si(peak['flops_best'], 'FLOP/s')} best")
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.dtype}, median of {args.steps} steps "
          f"after compilation and {args.warmup} warm-up steps\n")

    tokens = args.batch_size * args.seq_len
    results = {}
    print(f"{'preset':<7}{'params':>8}{'ours tok/s':>12}{'step ms':>9}{'cpu/wall':>9}{'MFU model':>11}"
          f"{'MFU exec':>10}{'torch tok/s':>13}{'step ms':>9}{'ratio':>7}")
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        config = model_config(preset)
        batches = random_batches(4, args.batch_size, args.seq_len)
        ours = bench_jax(preset, args, batches)
        fl = flops_per_step(config, args.batch_size, args.seq_len, ours["head_rows"])
        for kind in ("model", "executed"):
            ours[f"{kind}_flops_per_s"] = fl[f"{kind}_flops"] / ours["step_s"]
            ours[f"mfu_{kind}"] = ours[f"{kind}_flops_per_s"] / peak["flops_median"]
        entry = {"ours": ours, "flops_per_step": fl}
        if not args.no_torch:
            theirs = bench_torch(preset, args, info["cores"])
            theirs["model_flops_per_s"] = fl["model_flops"] / theirs["step_s"]
            theirs["mfu_model"] = theirs["model_flops_per_s"] / peak["flops_median"]
            entry["torch"] = theirs
            entry["ratio_to_torch"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        results[preset] = entry
        torch_cols = (f"{entry['torch']['tokens_per_s']:>13,.0f}{1e3 * entry['torch']['step_s']:>9.0f}"
                      f"{entry['ratio_to_torch']:>6.2f}x" if "torch" in entry else f"{'-':>13}{'-':>9}{'-':>7}")
        print(f"{preset:<7}{si(fl['n_params_mfu']):>8}{ours['tokens_per_s']:>12,.0f}{1e3 * ours['step_s']:>9.0f}"
              f"{ours['cpu_s_per_step'] / ours['step_s']:>9.2f}{100 * ours['mfu_model']:>10.1f}%"
              f"{100 * ours['mfu_executed']:>9.1f}%" + torch_cols, flush=True)

    print()
    for preset, e in results.items():
        o, f = e["ours"], e["flops_per_step"]
        line = (f"{preset}: {si(f['model_flops'] / tokens)}FLOP/token model (full head), "
                f"{si(f['executed_flops'] / tokens)}FLOP/token executed (head on {f['head_rows']} of {tokens} "
                f"positions), XLA counts {si(o['xla_flops'] / tokens)}FLOP/token; steps {1e3 * o['min_step_s']:.0f}-"
                f"{1e3 * o['max_step_s']:.0f} ms, {o['cpu_s_per_step']:.2f} CPU s/step; compile {o['compile_s']:.1f} s")
        if "torch" in e:
            t = e["torch"]
            line += (f"\n       torch: {t['steps_per_s']:.2f} steps/s, MFU {100 * t['mfu_model']:.1f}%, steps "
                     f"{1e3 * t['min_step_s']:.0f}-{1e3 * t['max_step_s']:.0f} ms, "
                     f"{t['cpu_s_per_step']:.2f} CPU s/step "
                     f"({t['attn_implementation']} attention, {t['threads']} threads)")
        print(line)
    return results, peak


if __name__ == "__main__":
    main()
