"""``TrainConfig``: every training setting, with Hugging Face's names and RoBERTa's defaults,
checked once; and the settings a plain ``train DIR`` resumes with."""

from __future__ import annotations

import dataclasses
import math

from mlmtool.constants import (DECAY_SHAPES, DTYPES, MASKING_MODES, OPTIMIZERS, PRNG_IMPLS, REMAT_POLICIES, SCHEDULES,
                               choice_error)
from mlmtool.errors import ConfigError, TrainingError
from mlmtool.modeldir import checkpoint_meta


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training arguments, named as in HF's TrainingArguments; defaults from the seed notebook."""

    per_device_train_batch_size: int = 64       # the seed's per_device_batch_size
    per_device_eval_batch_size: int | None = None  # None: same as training
    learning_rate: float = 5e-5                 # the seed's
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                   # used when warmup_steps is 0
    num_train_epochs: float = 10.0              # the seed's num_epochs
    max_steps: int = -1                         # > 0 overrides num_train_epochs
    max_tokens: int = 0                         # > 0: train on this many tokens (what papers report) instead
    max_time: float = 0.0                       # > 0: a wall-clock budget in seconds (Cramming's); the schedule
    #                                             follows the elapsed fraction, the steps are an upper bound
    lr_scheduler: str = "linear"                # linear warm-up then linear decay (run_mlm_flax); see optim
    decay_steps: int = 0                        # wsd: steps of the final decay (0: decay_ratio of the run)
    decay_ratio: float = 0.1                    # wsd: the last 10% of the run, as in Hägele et al. 2024
    decay_shape: str = "1-sqrt"                 # wsd: 1-sqrt (ModernBERT's), linear or cosine
    optimizer: str = "adamw"                    # adamw | adafactor | lamb | lion | stable-adamw (see optim)
    weight_decay: float = 0.01                  # the seed's
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98                    # RoBERTa's (more stable than 0.999 at large batch)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0                  # HF Trainer's default; 0 disables clipping
    gradient_accumulation_steps: int = 1
    mlm_probability: float = 0.15               # BERT's 15% (at the first step, with mlm_probability_final)
    mlm_probability_final: float | None = None  # the rate at the last step, linearly by step (None: constant)
    masking: str = "token"                      # token | whole-word | span (mlmtool.training.masking)
    document_attention: bool | None = None      # attend within each packed document only (None: the family's)
    data: str | None = None                     # the block store: 'prepare --name' (None: DIR/data)
    max_predictions_per_seq: int | None = None  # None: a device's rows share mean + 5 sd slots
    dtype: str = "float32"                      # computation dtype; bfloat16 on TPU/GPU
    gradient_checkpointing: str = "none"        # remat per layer: none | dots | full (model.REMAT_POLICIES)
    scan_layers: bool | None = None             # None: scan the layers when gradient checkpointing is on
    prng_impl: str = "threefry2x32"             # jax's default; rbg / unsafe_rbg are the accelerators' fast ones
    seed: int = 0                               # the seed's training_seed
    logging_steps: int = 100
    eval_steps: int | None = None               # None: evaluate at the end only
    eval_minimal_pairs: str | None = None       # a JSON-lines file of minimal pairs scored at each evaluation
    save_steps: int = 500
    save_total_limit: int | None = 3            # keep the 3 newest checkpoints (None: all)

    def validate(self) -> None:
        """Every option's range and choice, checked before any work."""
        self.validate_ranges()
        from mlmtool.training.masking import MAX_SPAN_RATE

        final = self.mlm_probability_final
        choices = [("--masking", self.masking, MASKING_MODES), ("--lr-scheduler", self.lr_scheduler, SCHEDULES),
                   ("--decay-shape", self.decay_shape, DECAY_SHAPES), ("--optimizer", self.optimizer, OPTIMIZERS),
                   ("--dtype", self.dtype, DTYPES), ("--gradient-checkpointing", self.gradient_checkpointing,
                                                     REMAT_POLICIES), ("--prng-impl", self.prng_impl, PRNG_IMPLS)]
        checks = [
            *((value in allowed, choice_error(option, value, allowed)) for option, value, allowed in choices),
            (self.masking != "span" or max(self.mlm_probability, final or 0.0) <= MAX_SPAN_RATE,
             f"span masking leaves at least one word between spans: its rate is at most {MAX_SPAN_RATE:.2f}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message, "fix the option and run again")

    def validate_ranges(self) -> None:
        """The numbers' ranges (a NaN fails every comparison); imports nothing, so that the CLI
        checks them before jax loads."""
        finite = math.isfinite
        final = self.mlm_probability_final
        checks = [
            (self.per_device_train_batch_size > 0,
             f"--per-device-train-batch-size must be positive, got {self.per_device_train_batch_size}"),
            (self.per_device_eval_batch_size is None or self.per_device_eval_batch_size > 0,
             f"--per-device-eval-batch-size must be positive, got {self.per_device_eval_batch_size}"),
            (0 < self.learning_rate < math.inf, f"--learning-rate must be a positive number, got {self.learning_rate}"),
            (0 <= self.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1), got {self.adam_beta1}"),
            (0 <= self.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}"),
            (0 < self.adam_epsilon < math.inf, f"--adam-epsilon must be a positive number, got {self.adam_epsilon}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be a number >= 0, got {self.weight_decay}"),
            (0 <= self.max_grad_norm < math.inf, f"--max-grad-norm must be a number >= 0 (0: no clipping), "
                                                 f"got {self.max_grad_norm}"),
            (finite(self.num_train_epochs), f"--num-train-epochs must be a finite number, got {self.num_train_epochs}"),
            (self.max_steps < 2**31, f"--max-steps must be below 2^31, got {self.max_steps}"),
            (0 <= self.max_time < math.inf, f"--max-time must be a finite duration >= 0, got {self.max_time}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2^32), got {self.seed}"),
            (self.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be positive"),
            (0.0 < self.mlm_probability < 1.0, f"--mlm-probability must be in (0, 1), got {self.mlm_probability}"),
            (final is None or 0.0 < final < 1.0, f"--mlm-probability-final must be in (0, 1), got {final}"),
            (self.decay_steps >= 0, "--decay-steps must not be negative"),
            (0.0 < self.decay_ratio <= 1.0, "--decay-ratio must be in (0, 1]"),
            (self.logging_steps > 0, "--logging-steps must be positive"),
            (self.save_steps > 0, "--save-steps must be positive"),
            (self.eval_steps is None or self.eval_steps > 0, "--eval-steps must be positive"),
            (0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)"),
            (self.warmup_steps >= 0, "--warmup-steps must not be negative"),
            (self.warmup_steps < 2**31, f"--warmup-steps must be below 2^31, got {self.warmup_steps}"),
            (self.max_steps > 0 or self.max_tokens > 0 or self.num_train_epochs > 0,
             "give --max-steps, --max-tokens or a positive --num-train-epochs"),
            (0 <= self.max_tokens < 2**62, f"--max-tokens must be a number of tokens >= 0, got {self.max_tokens}"),
            (not (self.max_steps > 0 and self.max_tokens > 0), "give --max-steps or --max-tokens, not both"),
            (self.save_total_limit is None or self.save_total_limit > 0, "--save-total-limit must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message, "fix the option and run again")


def recorded_train_config(mdir) -> tuple[dict, int | None]:
    """The training settings recorded in DIR's latest checkpoint (``train_config`` in its
    metadata) and that checkpoint's step: what a plain ``train DIR`` resumes with
    (:func:`resume_settings`) and what ``eval`` scores the model as (:func:`document_attention_for`,
    its batch size).  ({}, None) without a readable checkpoint (a damaged one is reported where
    it is restored, with the way on); ({}, step) when it records none.  Without orbax."""
    steps = mdir.checkpoint_steps()
    if not steps:
        return {}, None
    try:
        recorded = checkpoint_meta(mdir.checkpoints_dir, steps[-1]).get("train_config")
    except (OSError, ValueError, AttributeError):
        return {}, None
    return (recorded if isinstance(recorded, dict) else {}), steps[-1]


def document_attention_for(family, requested: bool | None, recorded: bool | None = None) -> bool:
    """Whether a run attends within each packed document only: ``requested`` (the option)
    when given, else ``recorded`` (eval: as DIR's latest training run did), else the family's
    default; ConfigError if the family's network has none.

    Train and eval decide it here.  A model trained with it has only ever seen one document
    at a time: scoring its packed validation blocks with cross-document attention would
    measure something it was not trained for (and inference, one document per row, never
    does); a model trained across documents is scored as it was trained."""
    choice = requested if requested is not None else recorded
    on = family.document_attention_default if choice is None else bool(choice)
    if on and not family.document_attention:
        raise ConfigError(f"the {family.name} family's network does not implement document attention",
                          "drop --document-attention")
    return on


def check_eval_options(*, per_device_eval_batch_size: int | None, mlm_probability: float, dtype: str,
                       masking: str) -> None:
    """eval's options, before any work, by :meth:`TrainConfig.validate`: the same checks and
    messages as train's (a loss over no predicted token would read as perfect)."""
    TrainConfig(per_device_eval_batch_size=per_device_eval_batch_size, mlm_probability=mlm_probability,
                dtype=dtype, masking=masking).validate()


def resume_settings(mdir, cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, dict, int | None]:
    """The settings a plain ``mlmtool train DIR`` resumes with: those recorded in the latest
    checkpoint (:func:`recorded_train_config`), except the options given now (``explicit``),
    which win -- the ones that fix the data order must still match (:meth:`Trainer.initial_state`).
    Returns the config, the settings taken from the checkpoint and its step."""
    recorded, latest = recorded_train_config(mdir)
    names = {f.name for f in dataclasses.fields(cfg)}
    taken = {k: v for k, v in recorded.items() if k in names and k not in explicit and v != getattr(cfg, k)}
    return dataclasses.replace(cfg, **taken), taken, latest


# Settings that change no number of the run (a resume may change them without a word).
BOOKKEEPING = ("logging_steps", "eval_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size")


def resume_changes(mdir, cfg: TrainConfig, explicit: set[str]) -> dict:
    """{field: (recorded, now)} for the options given now that differ from the latest
    checkpoint's and change what is computed (``--masking``, ``--scan-layers``,
    ``--document-attention``, the learning rate, ...): the resumed run then differs from an
    uninterrupted one, which ``train`` says."""
    recorded, _ = recorded_train_config(mdir)
    return {k: (recorded[k], getattr(cfg, k)) for k in sorted(explicit)
            if k in recorded and k not in BOOKKEEPING and recorded[k] != getattr(cfg, k)}
