"""``mlmtool train DIR``: MLM pre-training on every device and host, resumable."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.cli import app
from mlmtool.cli.options import (DataOpt, Distributed, DocumentAttentionOpt, DryRunOpt, DtypeOpt, FindMaxBatchOpt,
                                 ForceOpt, MaskingOpt, MlmProbabilityOpt, ModelDirArg, PerDeviceEvalBatchOpt,
                                 ProfileStepsOpt, SeedOpt, choice, option_groups, parse_duration)
from mlmtool.training.train_config import TrainConfig

OPT = "Optimization"
SCHED = "Schedule and logging"
PERF = "Memory and speed"
D = TrainConfig()  # every default below is TrainConfig's: the library called from Python trains alike


@app.command("train")
@option_groups
def train_command(
    ctx: typer.Context,
    model_dir: ModelDirArg,
    per_device_train_batch_size: Annotated[int, typer.Option(
        envvar="MLMTOOL_PER_DEVICE_TRAIN_BATCH_SIZE", help="Sequences per device per step (the seed's 64).")]
    = D.per_device_train_batch_size,
    per_device_eval_batch_size: PerDeviceEvalBatchOpt = D.per_device_eval_batch_size,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=OPT)] = D.learning_rate,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.", rich_help_panel=OPT)] = D.warmup_steps,
    warmup_ratio: Annotated[float, typer.Option(help="Warm-up as a fraction of all steps (if --warmup-steps is 0).",
                                                rich_help_panel=OPT)] = D.warmup_ratio,
    num_train_epochs: Annotated[float, typer.Option(help="Epochs over the training blocks (the seed's 10).")]
    = D.num_train_epochs,
    max_steps: Annotated[int, typer.Option(help="Total optimizer steps; overrides --num-train-epochs when > 0.")]
    = D.max_steps,
    max_tokens: Annotated[int, typer.Option(
        help="Train on this many tokens (rounded up to whole steps) instead of --num-train-epochs.")] = D.max_tokens,
    max_time: Annotated[float, typer.Option(
        parser=parse_duration, metavar="DURATION",
        help="A wall-clock budget (e.g. 90m, 2h30m, 3600): stop when it is spent; the learning-rate schedule "
             "follows the elapsed share of it (Cramming's); the steps (epochs, --max-steps) are an upper bound. "
             "A resumed run continues the budget. 0: no budget.")] = D.max_time,
    lr_scheduler: Annotated[str, choice(
        "--lr-scheduler", constants.SCHEDULES,
        help="After warm-up: linear | cosine | constant | wsd (constant, then --decay-shape to 0 over the last "
             "--decay-steps) | inverse_sqrt.", rich_help_panel=OPT)] = D.lr_scheduler,
    decay_steps: Annotated[int, typer.Option(help="wsd: steps of the final decay (0: --decay-ratio of the run).",
                                             rich_help_panel=OPT)] = D.decay_steps,
    decay_ratio: Annotated[float, typer.Option(help="wsd: the share of the run that decays.",
                                               rich_help_panel=OPT)] = D.decay_ratio,
    decay_shape: Annotated[str, choice("--decay-shape", constants.DECAY_SHAPES, help="wsd: the shape of the decay.",
                                       rich_help_panel=OPT)] = D.decay_shape,
    optimizer: Annotated[str, choice(
        "--optimizer", constants.OPTIMIZERS,
        help="adamw | adafactor | lamb (large batches) | lion (3-10x lower --learning-rate) | stable-adamw "
             "(AdamW with per-tensor update clipping, ModernBERT's).", rich_help_panel=OPT)] = D.optimizer,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (never on biases and norm scales).",
                                                rich_help_panel=OPT)] = D.weight_decay,
    adam_beta1: Annotated[float, typer.Option(rich_help_panel=OPT)] = D.adam_beta1,
    adam_beta2: Annotated[float, typer.Option(help="RoBERTa's 0.98.", rich_help_panel=OPT)] = D.adam_beta2,
    adam_epsilon: Annotated[float, typer.Option(rich_help_panel=OPT)] = D.adam_epsilon,
    adafactor: Annotated[bool, typer.Option(
        help="Deprecated (removed in the next release): the same as --optimizer adafactor.",
        rich_help_panel=OPT)] = False,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the global gradient norm (0: off).",
                                                 rich_help_panel=OPT)] = D.max_grad_norm,
    gradient_accumulation_steps: Annotated[int, typer.Option(help="Micro-batches per optimizer step.",
                                                             rich_help_panel=OPT)] = D.gradient_accumulation_steps,
    mlm_probability: MlmProbabilityOpt = D.mlm_probability,
    mlm_probability_final: Annotated[Optional[float], typer.Option(
        help="The rate at the last step: --mlm-probability changes linearly into it over training, by step "
             "(e.g. 0.3 -> 0.15; default: constant).", show_default=False)] = D.mlm_probability_final,
    masking: MaskingOpt = D.masking,
    document_attention: DocumentAttentionOpt = D.document_attention,
    data: DataOpt = D.data,
    dtype: DtypeOpt = D.dtype,
    gradient_checkpointing: Annotated[str, choice(
        "--gradient-checkpointing", constants.REMAT_POLICIES,
        help="Recompute each layer's activations in the backward pass to save memory: none | dots (keep "
             "matmul outputs) | full (keep only each layer's input).", rich_help_panel=PERF)]
    = D.gradient_checkpointing,
    scan_layers: Annotated[Optional[bool], typer.Option(
        "--scan-layers/--no-scan-layers", help="Run the layers as one loop, compiled once (default: with "
        "--gradient-checkpointing, where it is what saves the memory). Checkpoints and exports are the same "
        "either way.", rich_help_panel=PERF,
        show_default=False)] = D.scan_layers,
    prng_impl: Annotated[str, choice(
        "--prng-impl", constants.PRNG_IMPLS,
        help="Random generator for masking and dropout (rbg and unsafe_rbg are faster on accelerators).",
        rich_help_panel=PERF)] = D.prng_impl,
    seed: SeedOpt = D.seed,
    logging_steps: Annotated[int, typer.Option(help="Log metrics every N steps.", rich_help_panel=SCHED)]
    = D.logging_steps,
    eval_steps: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (default: at the end).",
                                                      rich_help_panel=SCHED, show_default=False)] = D.eval_steps,
    eval_minimal_pairs: Annotated[Optional[str], typer.Option(
        "--eval-minimal-pairs", help="At every evaluation, also score this JSON-lines file of minimal pairs "
                                     "(as 'eval --minimal-pairs'; docs/judging.md).",
        rich_help_panel=SCHED, show_default=False)] = D.eval_minimal_pairs,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).",
                                            rich_help_panel=SCHED)] = D.save_steps,
    save_total_limit: Annotated[Optional[int], typer.Option(help="Keep the N newest checkpoints.",
                                                            rich_help_panel=SCHED)] = D.save_total_limit,
    checkpoint_dir: Annotated[Optional[str], typer.Option(
        "--checkpoint-dir", metavar="PATH", help="Keep the checkpoints in PATH (another disk, a shared or mounted "
        "file system), DIR/checkpoints becoming a link to it that every later command follows. Not a URL: mount an "
        "s3:// or gs:// bucket and give the mount's path (docs/corpora.md).", rich_help_panel=SCHED,
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume",
                                         help="Continue from the latest checkpoint in DIR if there is one.")] = True,
    from_checkpoint: Annotated[Optional[str], typer.Option(
        "--from-checkpoint", help="Start a NEW run (a stage: new schedule, optimizer, sequence length or data) from "
        "the weights of a checkpoint: latest | STEP (of DIR) | PATH (a step folder, checkpoints folder or model "
        "directory). DIR's checkpoints move to DIR/stages/N.", show_default=False)] = None,
    keep_optimizer_state: Annotated[bool, typer.Option(
        "--keep-optimizer-state", help="With --from-checkpoint: take its optimizer moments too.")] = False,
    force: ForceOpt = False,
    dist: Distributed = Distributed(),
    dry_run: DryRunOpt = False,
    find_max_batch: FindMaxBatchOpt = False,
    profile_steps: ProfileStepsOpt = 0,
) -> None:
    """Pre-train the model in DIR on its prepared data; checkpoints, resume, export to model.safetensors."""
    # The options are TrainConfig's fields, one for one (same names), beside the run's own.
    given = {**ctx.params, "optimizer": _optimizer(ctx, optimizer, adafactor)}
    cfg = TrainConfig(**{f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given})
    cfg.validate_ranges()  # before jax loads
    from mlmtool.training import checkpoint_dir as ckpt_place

    if checkpoint_dir is not None:
        ckpt_place.refuse_url(checkpoint_dir)  # on every process, before jax loads

    from mlmtool.runtime.progress import TrainProgress, say

    dist.join()
    mesh = dist.mesh

    from mlmtool.runtime import interrupt
    from mlmtool.runtime.sharding import is_main_process
    from mlmtool.training.train import Trainer

    main = is_main_process()
    out = say if main else (lambda *a, **k: None)
    with _locked(model_dir, main and not dry_run) as mdir:  # a dry run writes nothing in DIR
        if checkpoint_dir is not None and from_checkpoint is not None:
            from mlmtool.errors import ConfigError

            raise ConfigError("--checkpoint-dir goes with a run's first stage, not --from-checkpoint",
                              "give --checkpoint-dir on the first train; a new stage keeps DIR/checkpoints")
        if main:  # DIR/checkpoints -> PATH (made here), or a link made before that must still lead somewhere
            ckpt_place.place(mdir.checkpoints_dir, checkpoint_dir, create=not dry_run)
        if keep_optimizer_state and from_checkpoint is None:
            from mlmtool.errors import TrainingError

            raise TrainingError("--keep-optimizer-state goes with --from-checkpoint",
                                "add --from-checkpoint latest (or a step or path)")
        if resume and from_checkpoint is None:  # a plain "mlmtool train DIR" resumes with the recorded settings
            from mlmtool.training.train_config import resume_settings

            cfg, taken, step = resume_settings(mdir, cfg, _explicit(ctx, cfg))
            _say_changes(mdir, cfg, _explicit(ctx, cfg), out)
            if taken:
                out(f"Resuming with the settings recorded at step {step:,}: "
                    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in taken.items())
                    + " (options given now win; --no-resume --force starts over)")
        trainer = Trainer(mdir, cfg, mesh_spec=mesh)
        if main:
            _print_plan(trainer.plan, out)
        if dry_run or find_max_batch:
            from mlmtool.training.dryrun import dry_run as measure

            measure(trainer, resume=resume, new_stage=from_checkpoint is not None, find_max_batch=find_max_batch,
                    say=out)
            return
        from mlmtool.training.profiling import StepProfiler

        profiler = StepProfiler(mdir.profile_dir, profile_steps, out) if profile_steps else None
        record = (lambda: mdir.record("train", args=_args(cfg, mesh))) if main else None  # not for a refused run
        with interrupt.graceful() as stop, TrainProgress(trainer.plan.total_steps, 0, enabled=main) as progress:
            result = trainer.run(resume=resume, force=force, progress=progress, say=out,
                                 stop_requested=stop.requested, on_start=record, from_checkpoint=from_checkpoint,
                                 keep_optimizer_state=keep_optimizer_state, on_step=profiler)
        if profiler is not None:
            profiler.finish()  # a run that ended before its N traced steps
    if result.get("stopped_early"):
        from mlmtool.errors import TrainingError

        raise TrainingError(f"stopped at step {result['final_step']:,} by "
                            f"{stop.signal_name or 'a signal to another process'}; checkpoint saved",
                            f"run 'mlmtool train {model_dir}' again to resume")
    out(f"Done: step {result['final_step']:,}; model written to {result['exported']}")


@contextlib.contextmanager
def _locked(model_dir, main: bool):
    """DIR, with its lock held by process 0; if any process cannot open DIR or process 0
    cannot take the lock, every process stops with that error (none waits forever)."""
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.distributed import agree

    mdir = lock = error = None
    try:
        mdir = ModelDir(model_dir)
        lock = mdir.lock("train", enabled=main)
        lock.__enter__()
        if main:  # a stage start interrupted before: finish it or drop its half-written step 0
            from mlmtool.training import stages
            from mlmtool.runtime.progress import say

            stages.recover(mdir, say)
    except Exception as e:
        error = e
    try:
        agree(error=error)
    except BaseException:
        if error is None:
            lock.__exit__(None, None, None)
        raise
    try:
        yield mdir
    finally:
        lock.__exit__(None, None, None)


def _say_changes(mdir, cfg, explicit: set[str], out) -> None:
    from mlmtool.training.train_config import resume_changes

    changes = resume_changes(mdir, cfg, explicit)
    if changes:
        out("Resuming with changed settings: " + ", ".join(f"--{k.replace('_', '-')} {now} (was {was})"
                                                           for k, (was, now) in changes.items())
            + ": the run goes on differently from an uninterrupted one (no longer bit-identical)")


def _explicit(ctx: typer.Context, cfg) -> set[str]:
    """The TrainConfig fields given on the command line or by environment variable."""
    import dataclasses

    return {f.name for f in dataclasses.fields(cfg) if _given(ctx, f.name)} | (
        {"optimizer"} if _given(ctx, "adafactor") else set())  # --adafactor is --optimizer adafactor


def _given(ctx: typer.Context, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _optimizer(ctx: typer.Context, optimizer: str, adafactor: bool) -> str:
    """--optimizer, with the deprecated --adafactor (one more release) as its alias."""
    if not _given(ctx, "adafactor"):
        return optimizer
    from mlmtool.runtime.progress import err_console

    if not adafactor:
        err_console.print("[bold yellow]warning:[/] --no-adafactor is deprecated and changes nothing: leave it out",
                          soft_wrap=True, highlight=False)
        return optimizer
    if _given(ctx, "optimizer") and optimizer != "adafactor":
        from mlmtool.errors import ConfigError

        raise ConfigError(f"--adafactor (the same as --optimizer adafactor) contradicts --optimizer {optimizer}",
                          "give only --optimizer")
    err_console.print("[bold yellow]warning:[/] --adafactor is deprecated and goes in the next release: "
                      "use --optimizer adafactor", soft_wrap=True, highlight=False)
    return "adafactor"


def _args(cfg, mesh) -> dict:
    return {**dataclasses.asdict(cfg), "mesh": mesh}


def _si(x: float) -> str:
    units = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
    return next(f"{x / f:.3g} {u}" for f, u in units if x >= f or f == 1)


def _print_plan(plan, say) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e6:.1f}M)"),
        ("devices", f"{plan.devices} {plan.platform} ({plan.processes} process{'es' if plan.processes > 1 else ''}, "
                    f"mesh {', '.join(f'{k}={v}' for k, v in plan.mesh.items())})"),
        ("global batch", f"{plan.global_batch:,} = {plan.per_device_batch} per device x {plan.devices} devices"
                         + (f" x {plan.gradient_accumulation_steps} accumulation"
                            if plan.gradient_accumulation_steps > 1 else "")),
        ("sequence length", f"{plan.seq_len}"),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("training blocks", f"{plan.train_blocks:,} ({plan.steps_per_epoch:,} steps per epoch)"),
        ("validation blocks", f"{plan.validation_blocks:,}"),
        ("total steps", f"{plan.total_steps:,} ({plan.epochs:.2f} epochs, {plan.warmup_steps:,} warm-up)"
                        + (" at most" if plan.max_time else "")),
        *([("time budget", f"{plan.max_time:,.0f} s; the schedule follows its elapsed share")]
          if plan.max_time else []),
        ("dtype", plan.dtype + (f" on {plan.device_kind}" if plan.device_kind else "")),
        ("kernels", plan.kernels),
        ("masking", plan.masking),
        ("FLOPs per token", f"{_si(plan.flops_per_token)}FLOP executed"
                            + (f" (MFU against {_si(plan.peak_flops)}FLOP/s per device)" if plan.peak_flops
                               else "")),
    ]
    for k, v in rows:
        t.add_row(k, v)
    say(t)
