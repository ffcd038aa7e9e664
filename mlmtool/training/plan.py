"""The plan of a training run: the numbers that matter (batch, steps, tokens, prediction
slots, FLOPs), computed before anything is compiled and printed before training starts."""

from __future__ import annotations

import dataclasses
import math

from mlmtool.errors import TrainingError
from mlmtool.training.flops import peak_flops, training_flops_per_token
from mlmtool.training.masking import default_max_predictions
from mlmtool.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    """The numbers that matter, printed before training starts."""

    parameters: int
    devices: int
    processes: int
    mesh: dict
    per_device_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    seq_len: int
    tokens_per_step: int
    train_blocks: int
    validation_blocks: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    warmup_steps: int
    prediction_slots: int  # MLM-head slots per group of rows (see masking)
    rows_per_group: int
    dtype: str
    platform: str
    device_kind: str = ""
    kernels: str = ""                 # mlmtool.runtime.kernels choices, as the plan prints them
    masking: str = ""                 # masking mode, rate(s), slots and document attention, as printed
    flops_per_token: float = 0.0      # training FLOPs our step executes per token (mlmtool.training.flops)
    peak_flops: float | None = None   # one device's dense 16-bit peak, when known: MFU is logged
    max_time: float = 0.0             # --max-time: seconds of budget (the total steps are then an upper bound)


def max_mlm_probability(cfg: TrainConfig) -> float:
    """The highest masking rate of the run (the slots are sized for it)."""
    return max(cfg.mlm_probability, cfg.mlm_probability_final or 0.0)


def prediction_layout(cfg: TrainConfig, seq_len: int, row_variance: float | None = None) -> tuple[int, int]:
    """(slots, rows per group) of the MLM head: ``--max-predictions-per-seq`` slots for each
    row when given (BERT's per-row cap), else one group per device micro-batch sharing
    mean + 5 sd slots at the run's highest rate (the head shrinks by 42% at 32 x 128; see
    masking).  Whole-word and span masking pass the measured ``row_variance`` of one row's
    masked count (``masking.row_count_variance``)."""
    if cfg.max_predictions_per_seq:
        return cfg.max_predictions_per_seq, 1
    rows = cfg.per_device_train_batch_size
    return default_max_predictions(seq_len, max_mlm_probability(cfg), rows=rows, row_variance=row_variance), rows


def plan_training(cfg: TrainConfig, *, n_train: int, n_val: int, seq_len: int, n_devices: int,
                  parameters: int = 0, mesh: dict | None = None, platform: str = "cpu", processes: int = 1,
                  row_variance: float | None = None, device_kind: str = "", kernels: str = "",
                  hf_config: dict | None = None, document_attention: bool = False,
                  line_by_line: bool = False) -> Plan:
    """The run's plan, every field at once.  ``row_variance``: what sizes whole-word and span
    slots (``prediction_layout``); ``hf_config`` (config.json): the FLOPs per token, and with
    ``device_kind`` the peak the MFU is logged against; ``kernels`` (``describe_execution``),
    ``document_attention`` and ``line_by_line`` (the blocks') are what the plan prints."""
    micro = cfg.per_device_train_batch_size * n_devices
    global_batch = micro * cfg.gradient_accumulation_steps
    steps_per_epoch = n_train // global_batch
    if steps_per_epoch == 0:
        raise TrainingError(
            f"the global batch ({global_batch} = {cfg.per_device_train_batch_size} per device x {n_devices} "
            f"devices x {cfg.gradient_accumulation_steps} accumulation) is larger than the {n_train} training blocks",
            "lower --per-device-train-batch-size or prepare more data")
    if cfg.max_steps > 0:
        total = cfg.max_steps
    elif cfg.max_tokens > 0:  # the first step at which at least max_tokens tokens were seen
        total = math.ceil(cfg.max_tokens / (global_batch * seq_len))
    else:
        total = max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    if total >= 2**31:
        what = (f"--max-tokens {cfg.max_tokens:,} at {global_batch * seq_len:,} tokens per step" if cfg.max_tokens > 0
                else f"{cfg.num_train_epochs:g} epochs of {steps_per_epoch:,} steps")
        raise TrainingError(f"{what} are {total:,} steps, beyond the 2^31 a run can count",
                            "lower --num-train-epochs or --max-tokens, or set --max-steps")
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    slots, rows_per_group = prediction_layout(cfg, seq_len, row_variance)
    flops = 0.0
    if hf_config is not None:  # the MLM head runs on the prediction slots only
        flops = training_flops_per_token(hf_config, seq_len, slots / (rows_per_group * seq_len))["executed"]
    return Plan(parameters=parameters, devices=n_devices, processes=processes, mesh=mesh or {"data": n_devices},
                per_device_batch=cfg.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
                seq_len=seq_len, tokens_per_step=global_batch * seq_len, train_blocks=n_train,
                validation_blocks=n_val, steps_per_epoch=steps_per_epoch, total_steps=total,
                epochs=total / steps_per_epoch, warmup_steps=warmup, prediction_slots=slots,
                rows_per_group=rows_per_group, dtype=cfg.dtype, platform=platform, device_kind=device_kind,
                kernels=kernels, masking=describe_masking(cfg, slots, rows_per_group, document_attention, line_by_line),
                flops_per_token=flops, peak_flops=peak_flops(device_kind, cfg.dtype),
                max_time=cfg.max_time)


def describe_execution(module) -> str:
    """The plan's kernels line: ``mlmtool.runtime.kernels``' choices, gradient checkpointing, scanned layers."""
    text = module.kernels.describe()
    if module.remat != "none":
        text += f"; gradient checkpointing {module.remat}"
    scanned = module.remat != "none" if module.scan_layers is None else module.scan_layers
    return text + ("; layers scanned" if scanned else "")


def describe_masking(cfg: TrainConfig, slots: int, rows_per_group: int, document_attention: bool,
                     line_by_line: bool) -> str:
    """The plan's masking line: mode, rate(s), prediction slots and document attention."""
    rate = f"{cfg.mlm_probability:.0%}"
    if cfg.mlm_probability_final is not None and cfg.mlm_probability_final != cfg.mlm_probability:
        rate += f" -> {cfg.mlm_probability_final:.0%} (linear by step)"
    documents = "on" if document_attention else "off"
    if document_attention and line_by_line:
        documents += " (one document per --line-by-line block: nothing to separate)"
    return (f"{cfg.masking} {rate}, {slots:,} prediction slots per {rows_per_group} "
            f"row{'s' if rows_per_group > 1 else ''}; document attention {documents}")
