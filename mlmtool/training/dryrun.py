"""``mlmtool train DIR --dry-run``: what a run will cost, before it runs.

Builds and compiles the real step (the Trainer's, with every option of the command line),
times a few steps on the real batches, times one evaluation's batches, one checkpoint save
and the export into a temporary folder outside DIR, and prints tokens/s, MFU where the peak
is known, the step's device memory and whether the batch fits (with ``--find-max-batch``
the largest per-device batch that does, from compile-only programs: mlmtool.runtime.devmem), and
the projected wall time of the whole run::

    compile + remaining steps x step time + evaluations + checkpoint saves + export

Nothing in DIR is written or changed (no checkpoint, metrics, manifest or lock file): the
weights are a fresh initialisation, since the step's time does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

from mlmtool.runtime import devmem
from mlmtool.errors import TrainingError

EVAL_BATCHES = 10  # evaluation batches timed (after the one that compiles)


class _Head:
    """The first ``n`` blocks of a block store (what evaluate() reads of it)."""

    def __init__(self, store, n: int):
        self._store, self._n = store, min(n, len(store))

    def __len__(self) -> int:
        return self._n

    def __getattr__(self, name):
        return getattr(self._store, name)


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def dry_run(trainer, *, steps: int = 5, resume: bool = True, new_stage: bool = False, find_max_batch: bool = False,
            say=print) -> dict:
    """Measure ``trainer``'s step and project its whole run; returns the figures (see the
    module docstring).  ``resume``: steps already checkpointed in DIR are not projected."""
    import jax
    import jax.numpy as jnp

    from mlmtool.training.loader import BatchLoader

    cfg, plan, training = trainer.train_config, trainer.plan, trainer.training
    if steps < 1:
        raise TrainingError(f"--dry-run times {steps} steps", "time at least 1")
    done = 0
    if resume and not new_stage and trainer.mdir.checkpoint_steps():
        done = min(trainer.mdir.checkpoint_steps()[-1], plan.total_steps)
    remaining = plan.total_steps - done
    out: dict = {"total_steps": plan.total_steps, "start_step": done, "tokens_per_step": plan.tokens_per_step}

    t0 = time.perf_counter()
    state = training.init_state(jax.random.PRNGKey(cfg.seed))
    jax.block_until_ready(state)
    out["init_s"] = time.perf_counter() - t0
    accum = cfg.gradient_accumulation_steps
    loader = BatchLoader(trainer.train_store, accum=accum, micro_batch=plan.global_batch // accum, seed=cfg.seed,
                         steps_per_epoch=plan.steps_per_epoch, sharding=training.batch_sharding,
                         start=0, stop=min(steps + 1, plan.steps_per_epoch),
                         documents=training.step_kwargs["documents"])
    try:
        batches = [b for _, b in loader]
    finally:
        loader.close()
    clock = (jnp.float32(0.0),) if cfg.max_time > 0 else ()
    limit, limit_from = devmem.memory_limit()
    out.update(memory_limit_bytes=limit, memory_limit_from=limit_from)
    try:
        t0 = time.perf_counter()
        compiled = training.step.lower(state, batches[0], trainer.rng, *clock).compile()
        out["compile_s"] = time.perf_counter() - t0
        out["program_memory_bytes"] = devmem.program_bytes(compiled)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batches[0], trainer.rng, *clock)  # the first run: allocations
        jax.block_until_ready(metrics)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):  # dispatched back to back, as the loop does
            state, metrics = compiled(state, batches[(i + 1) % len(batches)], trainer.rng, *clock)
        jax.block_until_ready((state, metrics))
        out["step_s"] = (time.perf_counter() - t0) / steps
        out["first_step_s"] = first_s
    except Exception as e:
        if not _is_oom(e):
            raise
        out.update(fits=False, error=str(e).splitlines()[0][:300])
    out["peak_memory_bytes"] = devmem.peak_in_use()
    if "fits" not in out:  # it ran: on an accelerator that is the answer; on the CPU, host memory
        need = out["peak_memory_bytes"] or out["program_memory_bytes"]
        out["fits"] = True if out["peak_memory_bytes"] else devmem.fits(need, limit) if limit else None
    if find_max_batch:
        out["max_batch"], out["max_batch_memory"] = _largest_batch(trainer, limit)
    if "step_s" in out:
        out["tokens_per_s"] = plan.tokens_per_step / out["step_s"]
        if plan.peak_flops:
            out["mfu"] = out["tokens_per_s"] * plan.flops_per_token / (plan.peak_flops * plan.devices)
        out.update(_evaluation(trainer, state.params))
        out.update(_save_and_export(trainer, state))
        out.update(_projection(cfg, plan, out, remaining, new_stage))
    _report(out, cfg, plan, say)
    if out.get("fits") is False and "step_s" not in out:
        hint = (f"lower --per-device-train-batch-size (the largest that fits: {out['max_batch']})"
                if out.get("max_batch") else "lower --per-device-train-batch-size (--find-max-batch finds the "
                                             "largest that fits)")
        raise TrainingError(f"the step at {cfg.per_device_train_batch_size} sequences per device does not fit in "
                            f"{limit_from}", hint + ", or add --gradient-checkpointing full")
    return out


def _evaluation(trainer, params) -> dict:
    """Seconds of one evaluation over the validation blocks: one batch first (it compiles), then
    the time per batch from the difference of two evaluations (of 2 and 10 batches), scaled to
    every batch."""
    store = trainer.val_store
    if store is None:
        return {}
    per_device = trainer.train_config.per_device_eval_batch_size or trainer.train_config.per_device_train_batch_size
    global_batch = per_device * trainer.mesh.size
    n_batches = math.ceil(len(store) / global_batch)
    full = trainer.val_store

    def timed(k: int) -> float:
        trainer.val_store = _Head(full, k * global_batch)
        t0 = time.perf_counter()
        trainer.evaluate(params)
        return time.perf_counter() - t0

    try:
        first = timed(1)  # builds and compiles the eval step
        few, many = min(n_batches, 2), min(n_batches, EVAL_BATCHES)
        t_few, t_many = timed(few), timed(many)
    finally:
        trainer.val_store = full
    # the difference of two evaluations leaves out what each one costs besides its batches
    per_batch = (t_many - t_few) / (many - few) if many > few else t_many / many
    per_batch = max(per_batch, 0.0)
    overhead = max(t_few - per_batch * few, 0.0)
    return {"eval_batches": n_batches, "eval_s": overhead + per_batch * n_batches,
            "eval_compile_s": max(first - t_few / few, 0.0)}


def _save_and_export(trainer, state) -> dict:
    """One checkpoint save and the export, timed in a temporary folder outside DIR."""
    import jax

    from mlmtool.training import checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="mlmtool-dry-run-"))
    try:
        t0 = time.perf_counter()
        with checkpoint.manager(tmp / "checkpoints") as mngr:
            checkpoint.save(mngr, 1, state.params, state.opt_state, {"step": 1, "dry_run": True})
            checkpoint.wait(mngr)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        params = jax.device_get(state.params) if jax.process_count() == 1 else None
        if params is not None:
            trainer.model.save_hf(params, tmp / "model.safetensors")
        export_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"save_s": save_s, "export_s": export_s}


def _projection(cfg, plan, m: dict, remaining: int, new_stage: bool) -> dict:
    end = plan.total_steps
    start = end - remaining
    saves = len(set(range((start // cfg.save_steps + 1) * cfg.save_steps, end + 1, cfg.save_steps)) | {end})
    saves += 1 if new_stage else 0  # a new stage saves its step 0 first
    evals = 0
    if "eval_s" in m:
        evals = 1 + (len(range((start // cfg.eval_steps + 1) * cfg.eval_steps, end, cfg.eval_steps))
                     if cfg.eval_steps else 0)
    parts = {"init": m["init_s"], "compile": m["compile_s"] + m["first_step_s"] - m["step_s"],
             "steps": remaining * m["step_s"],
             "evaluations": evals * m.get("eval_s", 0.0) + (m.get("eval_compile_s", 0.0) if evals else 0.0),
             "checkpoint saves": saves * m["save_s"], "export": m["export_s"]}
    total = sum(parts.values())
    if cfg.max_time > 0:
        total = min(total, cfg.max_time + parts["init"] + parts["export"] + parts["compile"])
    return {"evaluations": evals, "saves": saves, "projected_parts_s": parts, "projected_s": total}


def _largest_batch(trainer, limit: int | None) -> tuple[int | None, dict[int, int]]:
    """The largest per-device batch whose compiled step fits ``limit`` (compile-only)."""
    import jax
    import jax.numpy as jnp

    from mlmtool.training.plan import prediction_layout

    if limit is None:
        return None, {}
    cfg, plan, training = trainer.train_config, trainer.plan, trainer.training
    clock = (jnp.float32(0.0),) if cfg.max_time > 0 else ()

    def need_at(b: int) -> int | None:
        slots, rows = prediction_layout(dataclasses.replace(cfg, per_device_train_batch_size=b), plan.seq_len,
                                        training.row_variance)
        step, batch_sh = training.step_with_slots(slots, rows)
        shape = (cfg.gradient_accumulation_steps, b * plan.devices, plan.seq_len)
        batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
        if training.step_kwargs["documents"]:  # and where the documents start
            batch = (batch, jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=batch_sh))
        try:
            return devmem.program_bytes(step.lower(training.abstract_state, batch, trainer.rng, *clock).compile())
        except Exception as e:
            if _is_oom(e):
                return None
            raise

    return devmem.largest_batch(need_at, cfg.per_device_train_batch_size, limit)


def _gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _duration(s: float) -> str:
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h{m:02d}m{s:02d}s" if h or d else f"{m}m{s:02d}s")


def _report(m: dict, cfg, plan, say) -> None:
    say("Dry run: the real step, compiled and timed; nothing in DIR was written or changed.")
    rows = []
    if "compile_s" in m:
        rows.append(("compile", f"{m['compile_s']:.1f} s"))
    if "step_s" in m:
        rows.append(("step time", f"{1e3 * m['step_s']:,.1f} ms (mean of the steps after the first)"))
        rows.append(("tokens/s", f"{m['tokens_per_s']:,.0f}"))
        rows.append(("MFU", f"{100 * m['mfu']:.1f}%" if "mfu" in m else "- (no known peak for this device)"))
    memory = f"program {_gb(m.get('program_memory_bytes'))}"
    if m.get("peak_memory_bytes"):
        memory += f", peak in use {_gb(m['peak_memory_bytes'])}"
    memory += f", of {_gb(m['memory_limit_bytes'])} ({m['memory_limit_from']})"
    rows.append(("device memory", memory))
    fit = {True: "yes", False: "NO", None: "unknown"}[m.get("fits")]
    rows.append(("batch fits", f"{fit} ({cfg.per_device_train_batch_size} per device)"))
    if "max_batch" in m:
        rows.append(("largest batch that fits", f"{m['max_batch']} per device" if m["max_batch"] else
                     "unknown (the memory limit is unknown, or no batch fits)"))
    if "projected_s" in m:
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in m["projected_parts_s"].items())
        rows.append(("projected wall time", f"{_duration(m['projected_s'])} for steps {m['start_step']:,}.."
                                            f"{m['total_steps']:,} ({parts}; {m['evaluations']} evaluation(s), "
                                            f"{m['saves']} checkpoint save(s))"))
        if cfg.max_time > 0:
            rows.append(("time budget", f"--max-time {cfg.max_time:,.0f} s caps the steps"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        say(f"  {k:<{width}}  {v}")
