"""Training throughput on an accelerator: tokens/s, MFU, memory and compile time of mlmtool's
real step, beside transformers + torch.compile on the same batches.

    python scripts/bench_accel.py --device-check            # what scripts/device_check.sh runs on a GPU
    python scripts/bench_accel.py --device-check --smoke    # the same phases and A/B list, CPU sizes
    python scripts/bench_accel.py --models roberta-base --batch-sizes 128,512 --ab none --no-torch

For each model (``roberta-base`` at sequence length 128, the seed's, batches 256 and 1024;
``modernbert-base`` at 1024, its sliding and global layers, batches 16 and 32) it times
the step ``step.build_training`` sets up (what ``mlmtool train`` runs: on-device masking,
forward, backward, clipping, AdamW, donated state) on random rows that start with ``<s>`` and end with ``</s>``,
at each batch size (ascending).  A batch that the programs compiled before predict cannot fit
is skipped without compiling (``mlmtool.runtime.devmem``); one that compiles over the memory is not
run.  Per configuration: median step time over ``--steps`` fully synchronised steps after
compilation and warm-up, tokens/s, sequences/s, training FLOPs per token (``mlmtool.training.flops``:
``executed``, the MLM head only at the prediction slots, and ``model``, the head everywhere
as Hugging Face computes it), MFU against the device's dense bf16 peak and against a
``jnp.dot`` measured in the same run, the program's device memory and the process's peak,
and the compile time.

Then, at each model's largest batch that ran (``--ab-batch`` to choose): the peer, in a child
process (so that neither framework holds the other's memory): transformers'
``RobertaForMaskedLM`` / ``ModernBertForMaskedLM`` with ``torch.compile``, bf16 autocast, fused
AdamW with HF Trainer's parameter groups, gradient clipping, ``DataCollatorForLanguageModeling``
masking on the device and HF's loss, on the same batches (``ours_over_torch``); a
``jax.profiler`` trace by kind of kernel (``--profile``, ``mlmtool.training.profiling``); and the kernel
A/B runs (``--ab``), each one switch away from the defaults.  ``--budget`` stops the phases in
that order of importance.  Ends with one JSON line; with ``--json-out FILE`` also writes it
there (docs/bench/accel-<device>-<date>.json).  ``--summarize`` adds the real loop's figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import median, print_json, si  # noqa: E402
from bench_train import build_bench_training, random_batches  # noqa: E402

# model -> (preset, sequence length, batch sizes): the seed's roberta-base at 128; ModernBERT at
# 1024 (its rows are 8x longer: a batch of 16 is 128 of roberta's in tokens).
MODELS = {"roberta-base": ("roberta-base", 128, "256,1024"), "modernbert-base": ("modernbert-base", 1024, "16,32")}
SMOKE_SIZES = {"roberta-base": ("tiny", 32, "2,4"), "modernbert-base": ("modernbert-tiny", 64, "2,4")}
ATTN_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT/RoBERTa's, ModernBERT's
AB = {  # name -> (MLMTOOL_KERNELS, TrainConfig changes, config.json changes); in order of importance
    "attention=xla": ("attention=xla", {}, {k: 0.0 for k in ATTN_DROPOUT_KEYS}),  # vs no-attn-dropout (cuDNN)
    "no-attn-dropout": ("", {}, {k: 0.0 for k in ATTN_DROPOUT_KEYS}),
    "prng=rbg": ("", {"prng_impl": "rbg"}, {}),
    "dense=flat": ("dense=flat", {}, {}),
    "dropout=fused-threefry": ("dropout=fused-threefry", {}, {}),
}
ALIASES = {"no-attn-dropout+attention=xla": "attention=xla"}  # the name before 2026-12 (it held a comma)
DEVICE_CHECK = ["--profile", "/tmp/mlmtool-profile", "--budget", "270"]  # what scripts/device_check.sh runs


def parse_ab(text: str) -> list[str]:
    """``--ab``: comma-separated A/B names (or 'none'); an unknown name is an error, not a KeyError."""
    if text.strip() in ("", "none"):
        return []
    names = [ALIASES.get(x.strip(), x.strip()) for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in AB]
    if unknown:
        raise SystemExit(f"--ab: unknown {', '.join(unknown)} (choose from {', '.join(AB)}, or none)")
    return list(dict.fromkeys(names))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="roberta-base,modernbert-base",
                   help="comma-separated, from: " + ", ".join(MODELS))
    p.add_argument("--batch-sizes", help="sequences per step, ascending, for every model (default: each "
                   "model's own: " + "; ".join(f"{m} {v[2]}" for m, v in MODELS.items()) + ")")
    p.add_argument("--find-max", action="store_true",
                   help="after the largest batch size, keep doubling it until one does not fit (at most 16384)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--ab", default=",".join(AB), help="kernel A/B runs (comma-separated, or 'none'): " + ", ".join(AB))
    p.add_argument("--ab-batch", type=int, default=0,
                   help="batch size of the A/B runs (default: each model's largest batch that fit)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers + torch peer")
    p.add_argument("--torch-batch-sizes", default="",
                   help="batch sizes the peer runs (torch.compile per shape; default: the A/B batch)")
    p.add_argument("--memory-limit-gb", type=float,
                   help="plan for this much device memory (default: the device's; on the CPU the host's available)")
    p.add_argument("--device-check", action="store_true",
                   help="the phases scripts/device_check.sh runs: " + " ".join(DEVICE_CHECK))
    p.add_argument("--summarize", metavar="JSON", help="add the real loop's figures (--train-metrics) to this "
                   "benchmark JSON, rewrite it and print the summary; runs nothing else")
    p.add_argument("--train-metrics", metavar="FILE", help="with --summarize: the metrics.jsonl of 'mlmtool train'")
    p.add_argument("--train-batch", type=int, default=256, help="with --summarize: the batch of that run")
    p.add_argument("--no-torch-compile", action="store_true", help="the peer in eager mode")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the bf16 jnp.dot peak probe")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes that run anywhere in seconds (preset tiny, seq 32, batches 2,4)")
    p.add_argument("--compile-ab", metavar="PRESET",
                   help="also compile (not run) PRESET's step at --ab-batch with layers unrolled, scanned, and "
                        "scanned with gradient checkpointing: compile time and program memory (e.g. roberta-large)")
    p.add_argument("--profile", metavar="DIR",
                   help="trace 3 more steps of the first model at --ab-batch with jax.profiler into DIR and print "
                        "the device's kernel time by kind (matmuls, attention, XLA fusions, copies) and its idle share")
    p.add_argument("--budget", type=float, help="seconds: start no phase after that, stop a running one there")
    p.add_argument("--json-out", help="also write the JSON line to this file")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device_check:
        args = p.parse_args(DEVICE_CHECK + list(argv if argv is not None else sys.argv[1:]))
    args.ab_names = parse_ab(args.ab)
    if args.smoke:  # the same phases and A/B runs; only the sizes shrink
        args.steps, args.warmup, args.matmul_n = 2, 1, 256
    return args


def model_config(name: str, smoke: bool) -> tuple[str, dict, int, list[int]] | None:
    """(preset, config.json dict, sequence length, batch sizes) for ``name``; None when the
    preset is missing."""
    from mlmtool.errors import MlmtoolError
    from mlmtool.presets import build_config

    preset, seq_len, sizes = (SMOKE_SIZES if smoke else MODELS).get(name, (name, 128, "64,256"))
    try:
        return preset, build_config(preset), seq_len, [int(x) for x in sizes.split(",")]
    except MlmtoolError:
        return None


def token_range(config: dict) -> int:
    """Random rows draw ids below this: the vocabulary without the special ids above the
    first five (ModernBERT's [UNK]..[MASK] are 50280-50284)."""
    high = [config.get(k) for k in ("bos_token_id", "cls_token_id", "sep_token_id", "eos_token_id", "pad_token_id")]
    high = [x - 1 for x in high if isinstance(x, int) and x >= 5]  # - 1: the [UNK] before [CLS]
    return min([config["vocab_size"], *high])


# -- ours (child process) ---------------------------------------------------------------------

def is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def jax_worker(spec: dict) -> None:
    """Every configuration of ``spec["runs"]`` in this process; one JSON line each.  A batch
    whose program the ones compiled before say cannot fit is skipped (no compile)."""
    from mlmtool.runtime import compilation_cache

    if os.environ.get(compilation_cache.ENV):  # the device check's cache: a program compiled twice loads
        compilation_cache.configure()
    import jax

    from mlmtool.runtime import devmem
    from mlmtool.runtime.kernels import ENV

    dev = jax.devices()[0]
    limit, limit_from = devmem.memory_limit(dev)
    if spec.get("memory_limit_gb"):
        limit, limit_from = int(spec["memory_limit_gb"] * 2**30), "--memory-limit-gb"
    print(json.dumps({"device": {"backend": jax.default_backend(), "device_kind": dev.device_kind,
                                 "count": jax.device_count(), "jax": jax.__version__,
                                 "memory_limit_bytes": limit, "memory_limit_from": limit_from}}), flush=True)
    peak = measured_matmul(spec["matmul_n"], spec["dtype"])
    print(json.dumps({"matmul": peak}), flush=True)
    compiled_bytes: dict[tuple, dict[int, int]] = {}  # (model, variant) -> {batch: program bytes}
    for run in spec["runs"]:
        os.environ[ENV] = run.get("kernels", "")
        key = (run["model"], run["variant"].split(" ")[0], json.dumps(run.get("train", {}), sort_keys=True))
        est = devmem.linear_estimate(compiled_bytes.get(key, {}), run["batch_size"])
        if est is not None and limit and not devmem.fits(est, limit) and not run.get("compile_only"):
            out = {"error": f"skipped: about {est / 2**30:.1f} GiB by the programs compiled before, over "
                            f"{devmem.HEADROOM:.0%} of {limit / 2**30:.1f} GiB ({limit_from})",
                   "oom": True, "estimated_bytes": est}
        else:
            try:
                out = time_config(run, spec, limit)
            except Exception as e:  # report and go on: a configuration that does not fit is a result
                out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "oom": is_oom(e)}
        if out.get("program_memory_bytes"):
            compiled_bytes.setdefault(key, {})[run["batch_size"]] = out["program_memory_bytes"]
        print(json.dumps({"run": {**run, **out}}), flush=True)
        jax.clear_caches()
        gc.collect()


def measured_matmul(n: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)  # never zeros: see METHOD
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"n": n, "dtype": dtype, "flops": 2.0 * n ** 3 / median(times)}


def time_config(run: dict, spec: dict, limit: int | None = None) -> dict:
    import jax

    from mlmtool.runtime import devmem
    from mlmtool.training.train_config import TrainConfig

    config, seq_len, batch = run["config"], run["seq_len"], run["batch_size"]
    cfg = TrainConfig(per_device_train_batch_size=batch, dtype=spec["dtype"], max_steps=10_000, **run.get("train", {}))
    rows = random_batches(spec["n_batches"], batch, seq_len, vocab=token_range(config))
    # Trainer's set-up and jit (step.build_training) on a 1-device mesh
    loaded, training = build_bench_training(config, cfg, rows, vocab_size=config["vocab_size"])
    model, step, plan = loaded.module, training.step, training.plan
    if run.get("compile_only"):  # abstract arguments: nothing is allocated
        state = training.abstract_state
    else:
        state = training.init_state(jax.random.PRNGKey(0))
    rng = jax.random.key(0, impl=cfg.prng_impl)
    batches = [jax.device_put(b[None], training.batch_sharding) for b in rows]

    t0 = time.perf_counter()
    compiled = step.lower(state, batches[0], rng).compile()
    compile_s = time.perf_counter() - t0
    program_bytes = devmem.program_bytes(compiled)
    if run.get("compile_only"):
        return {"compile_s": compile_s, "program_memory_bytes": program_bytes}
    if limit and program_bytes and not devmem.fits(program_bytes, limit):  # compiled, but never allocated
        return {"error": f"does not fit: the program needs {program_bytes / 2**30:.1f} GiB of "
                         f"{limit / 2**30:.1f} GiB", "oom": True, "compile_s": compile_s,
                "program_memory_bytes": program_bytes}
    metrics = None
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        state, metrics = compiled(state, batches[i % len(batches)], rng)
        jax.block_until_ready((state, metrics))
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    m = jax.device_get(metrics)
    loss = float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)
    profile = {}
    if run.get("profile"):
        def one_step(i=[0]):
            nonlocal state
            state, out = compiled(state, batches[i[0] % len(batches)], rng)
            jax.block_until_ready((state, out))
            i[0] += 1

        from mlmtool.training.profiling import trace_steps

        profile = {"profile": trace_steps(run["profile"], one_step, 3, median(times))}
    stats = jax.devices()[0].memory_stats() or {}
    sec = median(times)
    return {"step_s": sec, "min_step_s": min(times), "max_step_s": max(times),
            "tokens_per_s": batch * seq_len / sec, "sequences_per_s": batch / sec,
            "compile_s": compile_s, "program_memory_bytes": program_bytes,
            "peak_memory_bytes": stats.get("peak_bytes_in_use"), "memory_limit_bytes": stats.get("bytes_limit"),
            "head_fraction": plan.prediction_slots / (plan.rows_per_group * seq_len),
            "kernels_used": model.kernels.describe(),
            "loss_last": loss, **profile}


# -- the peer (child process) -----------------------------------------------------------------

def torch_worker(spec: dict) -> None:
    """transformers' RobertaForMaskedLM / ModernBertForMaskedLM, torch.compile, bf16 autocast;
    one JSON line per configuration."""
    import torch
    import transformers

    from bench_train import hf_roberta_config, torch_adamw, torch_mlm_mask

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "device": torch.cuda.get_device_name() if cuda else "cpu"}), flush=True)
    for run in spec["runs"]:
        try:
            out = _torch_config(run, spec, dev, hf_roberta_config, torch_adamw, torch_mlm_mask)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   "oom": "out of memory" in str(e).lower()}
        print(json.dumps({"run": {**run, **out}}), flush=True)
        if cuda:
            torch.cuda.empty_cache()


def _torch_config(run, spec, dev, hf_roberta_config, torch_adamw, torch_mlm_mask) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    config, seq_len, batch = run["config"], run["seq_len"], run["batch_size"]
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.matmul.allow_tf32 = True
    if config["model_type"] == "roberta":
        model = transformers.RobertaForMaskedLM(hf_roberta_config(config)).to(dev)
    else:  # ModernBERT (sdpa attention, its sliding windows as a mask) from the same config.json
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
        model = transformers.AutoModelForMaskedLM.from_config(
            transformers.AutoConfig.for_model(config["model_type"], **fields)).to(dev)
    model.train()
    opt = torch_adamw(model, fused=True)
    fwd = torch.compile(model) if spec["torch_compile"] else model
    batches = [torch.as_tensor(b, dtype=torch.long, device=dev)
               for b in random_batches(spec["n_batches"], batch, seq_len, vocab=token_range(config))]
    gen = torch.Generator(device=dev).manual_seed(0)
    attention_mask = torch.ones_like(batches[0])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bfloat16")
    box = {"loss": None}

    def one_step(i):
        inputs, labels = torch_mlm_mask(batches[i % len(batches)], gen, config["vocab_size"])
        with autocast:
            loss = fwd(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        box["loss"] = loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    one_step(0)  # compiles
    sync()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, 1 + spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        one_step(i)
        sync()
        if i > spec["warmup"]:
            times.append(time.perf_counter() - t)
    sec = median(times)
    return {"step_s": sec, "min_step_s": min(times), "max_step_s": max(times),
            "tokens_per_s": batch * seq_len / sec, "sequences_per_s": batch / sec, "compile_s": compile_s,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "attn_implementation": model.config._attn_implementation, "torch_compile": spec["torch_compile"],
            "loss_last": float(box["loss"])}


# -- orchestration ------------------------------------------------------------------------------

def run_worker(kind: str, spec: dict, timeout: float | None = None) -> list[dict]:
    """The worker's JSON lines (whatever it printed before a crash or the timeout)."""
    cmd = [sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, err, code = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = "timed out", None
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    if code != 0:
        print(f"  ({kind} worker exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''})", flush=True)
    return lines


def device_tag(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind.lower().replace("nvidia ", "")).strip("-") or "cpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        (jax_worker if args.worker == "jax" else torch_worker)(spec)
        return
    if args.summarize:
        summarize(args)
        return

    from mlmtool.training.flops import peak_flops, training_flops_per_token

    deadline = time.monotonic() + args.budget if args.budget else None

    def remaining() -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    common = {"dtype": args.dtype, "steps": args.steps, "warmup": args.warmup, "n_batches": 4,
              "matmul_n": args.matmul_n, "memory_limit_gb": args.memory_limit_gb}
    defaults, ab_templates, compile_runs, skipped = plan_runs(args)
    for name in skipped:
        print(f"{name}: skipped (no such preset in this mlmtool)")

    # In order of importance, each phase only while the budget lasts: the batch sizes, then at
    # each model's largest batch that fit the profiles, the peer and the A/B runs; the largest
    # batch that fits, the compile-only runs.
    lines = run_worker("jax", {**common, "runs": defaults}, remaining())
    device = next((x["device"] for x in lines if "device" in x), {})
    matmul = next((x["matmul"] for x in lines if "matmul" in x), {})
    ours = [x["run"] for x in lines if "run" in x]
    ab_runs, ab_notes = plan_ab(args, ab_templates, ours)
    profiles = [r for r in ab_runs if "profile" in r]  # cheap with the compilation cache, and they say why
    if profiles and remaining() != 0.0:
        ours += [x["run"] for x in run_worker("jax", {**common, "runs": profiles}, remaining()) if "run" in x]
    theirs = [] if args.no_torch else run_peer(args, common, ours, remaining)
    rest = [r for r in ab_runs if "profile" not in r]
    if rest and remaining() != 0.0:
        ours += [x["run"] for x in run_worker("jax", {**common, "runs": rest}, remaining()) if "run" in x]
    if args.find_max:
        ours += find_max(common, ours, remaining)
    if compile_runs and remaining() != 0.0:
        ours += [x["run"] for x in run_worker("jax", {**common, "runs": compile_runs}, remaining()) if "run" in x]
    done = {(r["model"], r["variant"], r["batch_size"]) for r in ours}
    not_run = [f"{r['model']} {r['variant']} batch {r['batch_size']}" for r in defaults + ab_runs + compile_runs
               if (r["model"], r["variant"], r["batch_size"]) not in done]

    kind = device.get("device_kind", "unknown")
    peak = peak_flops(kind, args.dtype)
    for r in ours:
        r["dtype"] = args.dtype
        if "error" in r or r.get("compile_only"):
            continue
        fl = training_flops_per_token(r["config"], r["seq_len"], r["head_fraction"])
        r["flops_per_token_executed"], r["flops_per_token_model"] = fl["executed"], fl["model"]
        r["mfu"] = r["tokens_per_s"] * fl["executed"] / peak if peak else None
        r["mfu_model"] = r["tokens_per_s"] * fl["model"] / peak if peak else None
        r["mfu_measured_peak"] = r["tokens_per_s"] * fl["executed"] / matmul["flops"] if matmul else None
        r["ours_over_torch"] = None
    for r in theirs:
        r["dtype"] = args.dtype
        if "error" not in r:
            fl = training_flops_per_token(r["config"], r["seq_len"])  # the head on every position
            r["mfu"] = r["tokens_per_s"] * fl["model"] / peak if peak else None
            mine = [o for o in ours if o["variant"] == "default" and o["model"] == r["model"]
                    and o["batch_size"] == r["batch_size"] and "error" not in o]
            if mine:
                r["ours_over_torch"] = mine[0]["ours_over_torch"] = mine[0]["tokens_per_s"] / r["tokens_per_s"]

    print_report(device, matmul, peak, ours, theirs, args)
    for note in ab_notes:
        print(note)
    if not_run:
        print(f"not run (the --budget ran out or a worker died): {'; '.join(not_run)}")
    record = {"benchmark": "accel", "date": datetime.date.today().isoformat(), "device": kind,
              "backend": device.get("backend"), "jax": device.get("jax"), "dtype": args.dtype,
              "peak_flops": peak, "measured_matmul_flops": matmul.get("flops"), "smoke": args.smoke,
              "memory_limit_bytes": device.get("memory_limit_bytes"),
              "results": [_slim(r) for r in ours], "torch": [_slim(r) for r in theirs], "skipped": skipped,
              "ab_notes": ab_notes, "not_run": not_run}
    print_json(record)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, sort_keys=True, default=float) + "\n")


def plan_runs(args) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """(each model at each of its batch sizes, the A/B templates (their batch comes from
    :func:`plan_ab`), the compile-only runs, models without a preset)."""
    from mlmtool.presets import build_config

    defaults, ab_templates, compile_runs, skipped = [], [], [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        got = model_config(name, args.smoke)
        if got is None:
            skipped.append(name)
            continue
        preset, config, seq_len, sizes = got
        if args.batch_sizes:
            sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
        base = {"model": name, "preset": preset, "seq_len": seq_len, "config": config}
        defaults += [{**base, "variant": "default", "batch_size": b} for b in sorted(sizes)]
        for v in args.ab_names:
            kernels, train_changes, config_changes = AB[v]
            changes = {k: x for k, x in config_changes.items() if k in config and config[k] != x}
            ab_templates.append({**base, "config": {**config, **changes}, "variant": v, "kernels": kernels,
                                 "train": train_changes, "same_as_default": not (kernels or train_changes or changes)})
    if args.compile_ab:
        config = build_config(args.compile_ab)
        seq_len = next((s for p, s, _ in MODELS.values() if p == args.compile_ab), 128)
        for variant, changes in (("unrolled", {"scan_layers": False}), ("scanned", {"scan_layers": True}),
                                 ("scanned+remat full", {"gradient_checkpointing": "full"})):
            compile_runs.append({"model": args.compile_ab, "preset": args.compile_ab, "seq_len": seq_len,
                                 "config": config, "variant": f"compile only: {variant}",
                                 "batch_size": args.ab_batch or 32, "train": changes, "compile_only": True})
    return defaults, ab_templates, compile_runs, skipped


def largest_fit(ours: list[dict], model: str) -> int | None:
    """The largest batch of ``model``'s default runs that ran."""
    fits = [r["batch_size"] for r in ours if r["model"] == model and r["variant"] == "default" and "error" not in r]
    return max(fits) if fits else None


def plan_ab(args, templates: list[dict], ours: list[dict]) -> tuple[list[dict], list[str]]:
    """The profile and A/B runs at each model's largest batch that fit (``--ab-batch`` if
    given), the profiles first, then the A/Bs in AB's order, models alternating; and notes on
    what is left out (no batch fit; an A/B that changes nothing for that model)."""
    runs, notes, profiles = [], [], []
    models = list(dict.fromkeys(t["model"] for t in templates)) or \
        list(dict.fromkeys(r["model"] for r in ours))
    for name in models:
        batch = args.ab_batch or largest_fit(ours, name)
        if batch is None:
            notes.append(f"{name}: no A/B or profile runs (no batch size fit)")
            continue
        if args.profile:
            base = next(r for r in ours if r["model"] == name)
            profiles.append({k: base[k] for k in ("model", "preset", "seq_len", "config")} | {
                "variant": "default (profiled)", "batch_size": batch, "profile": f"{args.profile}/{name}-{batch}"})
    for v in args.ab_names:
        for t in templates:
            if t["variant"] != v:
                continue
            batch = args.ab_batch or largest_fit(ours, t["model"])
            if batch is None:
                continue
            if t["same_as_default"]:
                notes.append(f"{t['model']}: A/B {v} skipped (the same as its default)")
                continue
            runs.append({k: x for k, x in t.items() if k != "same_as_default"} | {"batch_size": batch})
    return profiles + runs, notes


def run_peer(args, common: dict, ours: list[dict], remaining) -> list[dict]:
    """transformers + torch at the batch sizes --torch-batch-sizes names (default: each
    model's largest batch that fit, the A/B batch), where ours ran them."""
    tsizes = [int(x) for x in args.torch_batch_sizes.split(",") if x.strip()]
    truns = [{k: r[k] for k in ("model", "preset", "seq_len", "config", "batch_size")}
             for r in ours if r["variant"] == "default" and "error" not in r
             and r["batch_size"] in (tsizes or [args.ab_batch or largest_fit(ours, r["model"])])
             and r["config"].get("model_type") in ("roberta", "bert", "modernbert")]
    if not truns or remaining() == 0.0:
        return []
    tspec = {**common, "runs": truns, "torch_compile": not args.no_torch_compile}
    return [x["run"] for x in run_worker("torch", tspec, remaining()) if "run" in x]


def find_max(common: dict, ours: list[dict], remaining) -> list[dict]:
    """Double each model's largest batch until one does not fit (or 16384, or the budget), in
    one worker: once one is over the memory its estimate skips the rest without compiling."""
    runs = []
    for name in dict.fromkeys(r["model"] for r in ours if r["variant"] == "default"):
        fits = [r for r in ours if r["model"] == name and r["variant"] == "default" and "error" not in r]
        if not fits:
            continue
        run = {k: fits[-1][k] for k in ("model", "preset", "seq_len", "config", "variant")}
        batch = max(r["batch_size"] for r in fits) * 2
        while batch <= 16384:
            runs.append({**run, "batch_size": batch})
            batch *= 2
    if not runs or remaining() == 0.0:
        return []
    got = [x["run"] for x in run_worker("jax", {**common, "runs": runs}, remaining()) if "run" in x]
    for name in dict.fromkeys(r["model"] for r in got):  # report up to the first that did not fit
        mine = [r for r in got if r["model"] == name]
        first_fail = next((i for i, r in enumerate(mine) if "error" in r), len(mine) - 1)
        got = [r for r in got if r["model"] != name] + mine[:first_fail + 1]
    return got


def summarize(args) -> None:
    """The device check's last stage: the real loop beside the bare step, the goals."""
    record = json.loads(Path(args.summarize).read_text())
    bare = [r for r in record["results"] if r["model"] == "roberta-base" and r["variant"] == "default"
            and r["batch_size"] == args.train_batch and "error" not in r]
    loop = None
    if args.train_metrics and Path(args.train_metrics).exists():
        logged = [json.loads(x) for x in Path(args.train_metrics).read_text().splitlines() if x.strip()]
        rates = [x["tokens_per_second"] for x in logged if x.get("tokens_per_second")]
        if rates:
            loop = median(rates[1:] or rates)  # the first window can hold the loader's start
    record["train_loop"] = {"tokens_per_s": loop, "batch_size": args.train_batch,
                            "bare_step_tokens_per_s": bare[0]["tokens_per_s"] if bare else None,
                            "loop_over_bare": loop / bare[0]["tokens_per_s"] if loop and bare else None}
    Path(args.summarize).write_text(json.dumps(record, sort_keys=True, default=float) + "\n")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    print(f"device {record['device']} ({record['backend']}), {record['dtype']}, {record['date']}"
          + (" (smoke sizes)" if record.get("smoke") else ""))
    print(f"{'model':<17}{'variant':<26}{'seq':>5}{'batch':>6}{'tokens/s':>12}{'MFU':>7}{'MFU model':>10}"
          f"{'ours/torch':>11}")
    for r in record["results"]:
        if "error" in r or r.get("compile_only"):
            continue
        ratio = "-" if r.get("ours_over_torch") is None else f"{r['ours_over_torch']:.2f}x"
        print(f"{r['model']:<17}{r['variant']:<26}{r['seq_len']:>5}{r['batch_size']:>6}{r['tokens_per_s']:>12,.0f}"
              f"{pct(r.get('mfu')):>7}{pct(r.get('mfu_model')):>10}{ratio:>11}")
    t = record["train_loop"]
    if t["loop_over_bare"]:
        print(f"mlmtool train loop: {t['tokens_per_s']:,.0f} tokens/s at batch {t['batch_size']}, "
              f"{t['loop_over_bare']:.2f}x the bare step")
    else:
        print("mlmtool train loop: no comparison (no metrics, or no bare step at its batch)")

    def best(model):
        rows = [r for r in record["results"] if r["model"] == model and r["variant"] == "default" and "error" not in r]
        return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None

    rb, mb = best("roberta-base"), best("modernbert-base")
    goals = [("roberta-base seq 128 >= 700k tokens/s", rb and rb["tokens_per_s"] >= 7e5),
             ("roberta-base >= 1.3x transformers+torch.compile", rb and (rb.get("ours_over_torch") or 0) >= 1.3),
             ("modernbert-base seq 1024 >= 300k tokens/s", mb and mb["tokens_per_s"] >= 3e5),
             ("train loop within 10% of the bare step", t["loop_over_bare"] and t["loop_over_bare"] >= 0.9)]
    for what, ok in goals:
        print(f"goal {what}: {'met' if ok else 'NOT met'}")


def _slim(r: dict) -> dict:
    """A run without its config.json (the JSON keeps the model name and what changed)."""
    return {k: v for k, v in r.items() if k != "config"}


def print_report(device, matmul, peak, ours, theirs, args) -> None:
    kind = device.get("device_kind", "?")
    print(f"device: {kind} ({device.get('backend')}, jax {device.get('jax')}); dtype {args.dtype}; "
          f"datasheet peak {si(peak, 'FLOP/s') if peak else 'unknown'}; "
          f"measured jnp.dot {matmul.get('n')}^3: {si(matmul['flops'], 'FLOP/s') if matmul else '-'}")
    print(f"median of {args.steps} steps after compilation and {args.warmup} warm-up steps\n")
    print(f"{'preset':<16}{'variant':<31}{'seq':>5}{'batch':>6}{'tok/s':>11}{'seq/s':>9}{'step ms':>9}"
          f"{'MFU':>7}{'MFU model':>10}{'of dot':>8}{'mem GiB':>9}{'compile s':>10}")
    for r in ours:
        head = f"{r['preset']:<16}{r['variant']:<31}{r['seq_len']:>5}{r['batch_size']:>6}"
        if "error" in r:
            print(head + ("  does not fit in memory" if r.get("oom") else f"  failed: {r['error']}"))
            continue
        if r.get("compile_only"):
            print(head + f"{'':>61}{(r['program_memory_bytes'] or 0) / 2**30:>9.2f}{r['compile_s']:>10.1f}")
            continue
        mem = r.get("peak_memory_bytes") or r.get("program_memory_bytes")

        def pct(x):
            return f"{100 * x:.1f}%" if x is not None else "-"

        print(head + f"{r['tokens_per_s']:>11,.0f}{r['sequences_per_s']:>9,.0f}{1e3 * r['step_s']:>9.1f}"
              f"{pct(r['mfu']):>7}{pct(r['mfu_model']):>10}{pct(r['mfu_measured_peak']):>8}"
              f"{(mem or 0) / 2**30:>9.2f}{r['compile_s']:>10.1f}")
    for r in theirs:
        head = f"{r['preset']:<16}{'transformers+torch':<31}{r['seq_len']:>5}{r['batch_size']:>6}"
        if "error" in r:
            print(head + f"  failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(head + f"{r['tokens_per_s']:>11,.0f}{r['sequences_per_s']:>9,.0f}{1e3 * r['step_s']:>9.1f}"
              f"{mfu:>7}{'':>10}{'':>8}{(r.get('peak_memory_bytes') or 0) / 2**30:>9.2f}{r['compile_s']:>10.1f}"
              + (f"   ours/torch {r['ours_over_torch']:.2f}x" if "ours_over_torch" in r else ""))
    from mlmtool.training.profiling import format_summary

    for r in ours:
        if r.get("profile"):
            print()
            print("\n".join(format_summary(r["profile"], f"profile of {r['preset']} at batch {r['batch_size']}")))
    fits = [r for r in ours if r["variant"] == "default" and "error" not in r and not r.get("compile_only")]
    for name in dict.fromkeys(r["model"] for r in fits):
        best = max((r for r in fits if r["model"] == name), key=lambda r: r["tokens_per_s"])
        largest = max(r["batch_size"] for r in fits if r["model"] == name)
        print(f"{name} ({best['preset']}): best {best['tokens_per_s']:,.0f} tok/s at batch {best['batch_size']}; "
              f"largest batch run {largest}; {si(best['flops_per_token_executed'])}FLOP/token executed, "
              f"{si(best['flops_per_token_model'])}FLOP/token with the head everywhere; "
              f"kernels: {best['kernels_used']}")


if __name__ == "__main__":
    main()
