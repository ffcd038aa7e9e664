"""Masked-language-model pre-training: the step, the optimizer, the loop.

Follows the recipe of RoBERTa (Liu et al. 2019, arXiv:1907.11692) as HF's
``run_mlm_flax.py`` and the "Pre-Training a Transformers model on TPU with Flax/JAX"
notebook use it: dynamic masking (a fresh mask every step, on the device), AdamW with
beta2 = 0.98 and weight decay (masked off biases and LayerNorm, as run_mlm_flax does),
linear warm-up then linear decay.  Structured like google/flax ``examples/lm1b``: a
pure ``train_step(state, batch, rng)`` that returns loss *sums* and a denominator (the
number of predicted tokens across the whole global batch, so the loss is a
token-weighted mean and not a mean of per-device means), per-step randomness from
``fold_in(rng, step)``, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlmtool import blocks, checkpoint, distributed as dist, sharding as sh
from mlmtool.errors import TrainingError
from mlmtool.flops import peak_flops, training_flops_per_token
from mlmtool.evaluate import evaluate, make_eval_fn, mlm_sums, unigram_top_token
from mlmtool.masking import default_max_predictions, mask_tokens
from mlmtool.optim import DECAY_SHAPES, OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


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
    lr_scheduler: str = "linear"                # linear warm-up then linear decay (run_mlm_flax); see optim
    decay_steps: int = 0                        # wsd: steps of the final decay (0: decay_ratio of the run)
    decay_ratio: float = 0.1                    # wsd: the last 10% of the run, as in Hägele et al. 2024
    decay_shape: str = "1-sqrt"                 # wsd: 1-sqrt (ModernBERT's), linear or cosine
    optimizer: str = "adamw"                    # adamw | adafactor | lamb | lion | stable-adamw (see optim)
    weight_decay: float = 0.01                  # the seed's
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98                    # RoBERTa's (more stable than 0.999 at large batch)
    adam_epsilon: float = 1e-8
    adafactor: bool = False                     # the old switch: the same as optimizer="adafactor"
    max_grad_norm: float = 1.0                  # HF Trainer's default; 0 disables clipping
    gradient_accumulation_steps: int = 1
    mlm_probability: float = 0.15               # BERT's 15%
    data: str | None = None                     # the block store: 'prepare --name' (None: DIR/data)
    max_predictions_per_seq: int | None = None  # None: a device's rows share mean + 5 sd slots
    dtype: str = "float32"                      # computation dtype; bfloat16 on TPU/GPU
    gradient_checkpointing: str = "none"        # remat per layer: none | dots | full (model.REMAT_POLICIES)
    scan_layers: bool | None = None             # None: scan the layers when gradient checkpointing is on
    prng_impl: str = "threefry2x32"             # jax's default; rbg / unsafe_rbg are the accelerators' fast ones
    seed: int = 0                               # the seed's training_seed
    logging_steps: int = 100
    eval_steps: int | None = None               # None: evaluate at the end only
    save_steps: int = 500
    save_total_limit: int | None = 3            # keep the 3 newest checkpoints (None: all)

    def __post_init__(self) -> None:
        if self.adafactor:  # one field for the fact: --adafactor is --optimizer adafactor
            object.__setattr__(self, "optimizer", "adafactor")
            object.__setattr__(self, "adafactor", False)

    def validate(self) -> None:
        """Every option's range, checked before any work (a NaN fails every comparison)."""
        from mlmtool.model import REMAT_POLICIES

        finite = math.isfinite
        checks = [
            (self.per_device_train_batch_size > 0, "--per-device-train-batch-size must be positive"),
            (self.per_device_eval_batch_size is None or self.per_device_eval_batch_size > 0,
             "--per-device-eval-batch-size must be positive"),
            (0 < self.learning_rate < math.inf, f"--learning-rate must be a positive number, got {self.learning_rate}"),
            (0 <= self.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1), got {self.adam_beta1}"),
            (0 <= self.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}"),
            (0 < self.adam_epsilon < math.inf, f"--adam-epsilon must be a positive number, got {self.adam_epsilon}"),
            (0 <= self.weight_decay < math.inf, f"--weight-decay must be a number >= 0, got {self.weight_decay}"),
            (0 <= self.max_grad_norm < math.inf, f"--max-grad-norm must be a number >= 0 (0: no clipping), "
                                                 f"got {self.max_grad_norm}"),
            (finite(self.num_train_epochs), f"--num-train-epochs must be a finite number, got {self.num_train_epochs}"),
            (self.max_steps < 2**31, f"--max-steps must be below 2^31, got {self.max_steps}"),
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2^32), got {self.seed}"),
            (self.gradient_accumulation_steps > 0, "--gradient-accumulation-steps must be positive"),
            (0.0 < self.mlm_probability < 1.0, "--mlm-probability must be in (0, 1)"),
            (self.lr_scheduler in SCHEDULES, f"--lr-scheduler must be one of {', '.join(SCHEDULES)}"),
            (self.decay_shape in DECAY_SHAPES, f"--decay-shape must be one of {', '.join(DECAY_SHAPES)}"),
            (self.decay_steps >= 0, "--decay-steps must not be negative"),
            (0.0 < self.decay_ratio <= 1.0, "--decay-ratio must be in (0, 1]"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16"),
            (self.gradient_checkpointing in REMAT_POLICIES,
             f"--gradient-checkpointing must be one of {', '.join(REMAT_POLICIES)}"),
            (self.prng_impl in PRNG_IMPLS, f"--prng-impl must be one of {', '.join(PRNG_IMPLS)}"),
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


def resume_settings(mdir, cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, dict, int | None]:
    """The settings a plain ``mlmtool train DIR`` resumes with: those recorded in the latest
    checkpoint (``train_config``), except the options given now (``explicit``), which win --
    the ones that fix the data order must still match (:meth:`Trainer.initial_state`).
    Returns the config, the settings taken from the checkpoint and its step."""
    try:
        latest = checkpoint.latest_step(mdir.checkpoints_dir)
        meta = checkpoint.restore_meta(mdir.checkpoints_dir, latest) if latest is not None else {}
        recorded = meta.get("train_config")
    except Exception:  # a damaged checkpoint is reported where it is restored, with the way on
        return cfg, {}, None
    if not isinstance(recorded, dict):
        return cfg, {}, latest
    names = {f.name for f in dataclasses.fields(cfg)}
    taken = {k: v for k, v in recorded.items() if k in names and k not in explicit and v != getattr(cfg, k)}
    return dataclasses.replace(cfg, **taken), taken, latest


@flax.struct.dataclass
class TrainState:
    step: jax.Array   # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


# -- the step ------------------------------------------------------------------------------

def train_step(state: TrainState, input_ids: jax.Array, rng: jax.Array, *, model, tx, schedule,
               pad_token_id: int, mask_kwargs: dict) -> tuple[TrainState, dict]:
    """One optimizer step over ``input_ids`` [A, B, L] (A gradient-accumulation micro-batches
    of B rows); returns the new state and summed metrics."""
    step_rng = jax.random.fold_in(rng, state.step)
    mask_rng, dropout_rng = jax.random.split(step_rng)
    accum = input_ids.shape[0]
    masked = jax.vmap(lambda k, x: mask_tokens(k, x, **mask_kwargs))(
        jax.random.split(mask_rng, accum), input_ids)  # fields [A, B, L] / [A, B, P]
    # Predicted tokens in the whole (accumulated, global) batch: the loss is sum / denominator.
    denominator = jnp.maximum(jnp.sum(masked.masked_weights), 1.0)

    def loss_fn(params, micro, ids, key):
        logits = model.apply({"params": params}, micro.input_ids, attention_mask=(ids != pad_token_id),
                             deterministic=False, masked_positions=micro.masked_positions,
                             rngs={"dropout": key})  # [B, P, V]
        loss_sum, correct_sum = mlm_sums(logits, micro.masked_labels, micro.masked_weights)
        return loss_sum / denominator, (loss_sum, correct_sum)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    dropout_keys = jax.random.split(dropout_rng, accum)
    if accum == 1:
        micro = jax.tree_util.tree_map(lambda x: x[0], masked)
        (_, (loss_sum, correct_sum)), grads = grad_fn(state.params, micro, input_ids[0], dropout_keys[0])
    else:
        def body(carry, xs):
            grads_acc, loss_acc, correct_acc = carry
            micro, ids, key = xs
            (_, (loss_sum, correct_sum)), grads = grad_fn(state.params, micro, ids, key)
            grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, correct_acc + correct_sum), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss_sum, correct_sum), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (masked, input_ids, dropout_keys))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss_sum": loss_sum,
        "accuracy_sum": correct_sum,
        "denominator": jnp.sum(masked.masked_weights),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        # False once the weights hold inf/nan: checked before every checkpoint (see _flush)
        "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)])),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


# -- data ----------------------------------------------------------------------------------

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a seeded permutation, the same on every process."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchLoader:
    """Host-side batches for steps ``start..stop``, prefetched on a thread.

    The global batch of step ``s`` is rows ``perm_e[p*G:(p+1)*G]`` of the train split,
    with ``e, p = divmod(s, steps_per_epoch)``: the position in the data is a function of
    the step, so resuming needs nothing but the step.  Each process reads only the rows
    its devices hold, and the global array is assembled from the processes' pieces.
    """

    def __init__(self, store, *, accum: int, micro_batch: int, seed: int, steps_per_epoch: int,
                 sharding, start: int, stop: int, prefetch: int = 2):
        self.store = store
        self.accum = accum
        self.micro_batch = micro_batch
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.sharding = sharding
        self.global_shape = (accum, micro_batch, store.seq_len)
        self.rows = sh.process_rows(sharding, self.global_shape, row_axis=1)
        self.start, self.stop = start, stop
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def host_batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(len(self.store), self.seed, epoch)
            self._perm_epoch = epoch
        per_step = self.accum * self.micro_batch
        idx = self._perm[pos * per_step:(pos + 1) * per_step].reshape(self.accum, self.micro_batch)  # [A, B]
        local = idx[:, self.rows]  # [A, B_local]: only this process's rows
        return self.store.read(local.reshape(-1)).reshape(self.accum, len(self.rows), self.store.seq_len)

    def _work(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self._stop.is_set():
                    return
                batch = sh.global_array(self.host_batch(step), self.sharding, self.global_shape)
                while not self._stop.is_set():
                    try:
                        self._queue.put((step, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the consumer
            self._queue.put((None, e))

    def __iter__(self) -> Iterator[tuple[int, jax.Array]]:
        self._thread = threading.Thread(target=self._work, name="mlmtool-prefetch", daemon=True)
        self._thread.start()
        for _ in range(self.start, self.stop):
            step, batch = self._queue.get()
            if step is None:
                raise batch
            yield step, batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- the loop ------------------------------------------------------------------------------

STOP_CHECK_EVERY = 10  # multi-process: steps between agreeing on a stop request (a host sync)


@dataclasses.dataclass
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
    kernels: str = ""                 # mlmtool.kernels choices, as the plan prints them
    flops_per_token: float = 0.0      # training FLOPs our step executes per token (mlmtool.flops)
    peak_flops: float | None = None   # one device's dense 16-bit peak, when known: MFU is logged


def build_model(mcfg, cfg: TrainConfig):
    """The network as ``cfg`` computes it (dtype, gradient checkpointing, scanned layers;
    kernels chosen for the backend by ``mlmtool.kernels``)."""
    from mlmtool.kernels import select
    from mlmtool.model import MaskedLM

    return MaskedLM(mcfg, dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
                    kernels=select(dtype=cfg.dtype, head_dim=mcfg.head_dim),
                    remat=cfg.gradient_checkpointing, scan_layers=cfg.scan_layers)


def state_shardings(mesh, abstract_state: TrainState) -> TrainState:
    return TrainState(step=sh.replicated(mesh), params=sh.state_shardings(mesh, abstract_state.params),
                      opt_state=sh.state_shardings(mesh, abstract_state.opt_state))


def jit_train_step(model, tx, schedule, mesh, state_sharding: TrainState, *, pad_token_id: int,
                   mask_kwargs: dict):
    """``train_step`` jitted as training runs it: sharded state (donated), the batch [A, B, L]
    split over the mesh's batch axes, a replicated key.  Returns (step, batch sharding)."""
    batch_sharding = sh.batch_sharding(mesh, leading_dims=1)
    step_fn = partial(train_step, model=model, tx=tx, schedule=schedule, pad_token_id=pad_token_id,
                      mask_kwargs=mask_kwargs)
    step = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, sh.replicated(mesh)),
                   out_shardings=(state_sharding, sh.replicated(mesh)), donate_argnums=(0,))
    return step, batch_sharding


def _describe_execution(model) -> str:
    text = model.kernels.describe()
    if model.remat != "none":
        text += f"; gradient checkpointing {model.remat}"
    scanned = model.remat != "none" if model.scan_layers is None else model.scan_layers
    return text + ("; layers scanned" if scanned else "")


def _model_and_config(mdir, cfg: TrainConfig):
    from mlmtool.model import ModelConfig

    config = mdir.read_config()
    mcfg = ModelConfig.from_dict(config)
    return config, mcfg, build_model(mcfg, cfg)


def _open_stores(mdir, config: dict):
    from mlmtool.blocks import BlockStore, read_meta
    from mlmtool.presets import max_sequence_length

    mdir.require_data()
    meta = read_meta(mdir.data_dir)
    train_store = BlockStore.open(mdir.data_dir, "train")
    has_validation = meta.get("num_blocks", {}).get("validation", 0)
    val_store = BlockStore.open(mdir.data_dir, "validation") if has_validation else None
    if train_store.vocab_size != config["vocab_size"]:
        raise TrainingError(
            f"the prepared data was made with a vocabulary of {train_store.vocab_size} but config.json says "
            f"vocab_size={config['vocab_size']}",
            f"run 'mlmtool tokenizer {mdir}' and 'mlmtool prepare {mdir} --force' again")
    _check_tokenizer(mdir, meta)
    if train_store.seq_len > max_sequence_length(config):
        raise TrainingError(f"blocks of {train_store.seq_len} tokens exceed the model's "
                            f"{max_sequence_length(config)} positions",
                            f"run 'mlmtool prepare {mdir} --max-seq-length {max_sequence_length(config)} --force'")
    return train_store, val_store


def _check_tokenizer(mdir, meta: dict) -> None:
    """The export is a Hugging Face directory: its tokenizer.json must be the one the data was made with."""
    import hashlib

    want = meta.get("tokenizer_sha256")
    path = mdir.tokenizer_path
    if not want or not path.exists():
        return
    if hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise TrainingError(f"{path} is not the tokenizer the data in {mdir.data_dir} was prepared with "
                            "(it was retrained, replaced or damaged)",
                            f"retrain it with 'mlmtool tokenizer {mdir} FILE...' if it is damaged, then run "
                            f"'mlmtool prepare {mdir} FILE... --force'")


def prediction_layout(cfg: TrainConfig, seq_len: int) -> tuple[int, int]:
    """(slots, rows per group) of the MLM head: ``--max-predictions-per-seq`` slots for each
    row when given (BERT's per-row cap), else one group per device micro-batch sharing
    mean + 5 sd slots (the head shrinks by 42% at 32 x 128; see masking)."""
    if cfg.max_predictions_per_seq:
        return cfg.max_predictions_per_seq, 1
    rows = cfg.per_device_train_batch_size
    return default_max_predictions(seq_len, cfg.mlm_probability, rows=rows), rows


def plan_training(cfg: TrainConfig, *, n_train: int, n_val: int, seq_len: int, n_devices: int,
                  parameters: int = 0, mesh: dict | None = None, platform: str = "cpu",
                  processes: int = 1) -> Plan:
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
    slots, rows_per_group = prediction_layout(cfg, seq_len)
    return Plan(parameters=parameters, devices=n_devices, processes=processes, mesh=mesh or {"data": n_devices},
                per_device_batch=cfg.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
                seq_len=seq_len, tokens_per_step=global_batch * seq_len, train_blocks=n_train,
                validation_blocks=n_val, steps_per_epoch=steps_per_epoch, total_steps=total,
                epochs=total / steps_per_epoch, warmup_steps=warmup, prediction_slots=slots,
                rows_per_group=rows_per_group,
                dtype=cfg.dtype, platform=platform)


class Trainer:
    """Builds the sharded state, restores or initialises it, runs the loop, exports."""

    def __init__(self, mdir, cfg: TrainConfig, *, mesh_spec: str | None = None):
        error = None
        try:
            self._setup(mdir, cfg, mesh_spec)
        except Exception as e:  # fail on every process together, not on one while the others wait
            error = e
        dist.agree(None if error else self._settings(), error=error, what="training settings",
                 hint="start every process with the same options on the same model directory (prepared once on "
                      "shared storage, or identically on every host)")

    def _setup(self, mdir, cfg: TrainConfig, mesh_spec: str | None) -> None:
        from mlmtool.model import init_params

        cfg.validate()
        self.mdir = mdir = mdir.with_data(cfg.data)
        self.cfg = cfg
        self.config, self.mcfg, self.model = _model_and_config(mdir, cfg)
        self.train_store, self.val_store = _open_stores(mdir, self.config)
        self.mesh = sh.make_mesh(mesh_spec)
        self.main = sh.is_main_process()
        self.multi = jax.process_count() > 1
        devs = sh.device_summary()

        abstract_params = jax.eval_shape(lambda r: init_params(self.mcfg, r), jax.random.PRNGKey(0))
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_params))
        self.plan = plan_training(cfg, n_train=len(self.train_store),
                                  n_val=len(self.val_store) if self.val_store else 0,
                                  seq_len=self.train_store.seq_len, n_devices=self.mesh.size,
                                  parameters=n_params, mesh=dict(self.mesh.shape), platform=devs["platform"],
                                  processes=devs["processes"])
        slot_share = self.plan.prediction_slots / (self.plan.rows_per_group * self.plan.seq_len)
        self.plan = dataclasses.replace(
            self.plan, device_kind=devs["device_kind"], kernels=_describe_execution(self.model),
            flops_per_token=training_flops_per_token(self.config, self.plan.seq_len, slot_share)["executed"],
            peak_flops=peak_flops(devs["device_kind"], cfg.dtype))
        self.schedule = make_schedule(cfg, self.plan.total_steps, self.plan.warmup_steps)
        self.tx = make_optimizer(cfg, self.schedule)

        def init_state(rng):
            params = init_params(self.mcfg, rng)
            return TrainState(step=jnp.int32(0), params=params, opt_state=self.tx.init(params))

        abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
        self.state_sharding = state_shardings(self.mesh, abstract_state)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_sharding)
        self._init_state = jax.jit(init_state, out_shardings=self.state_sharding)

        store = self.train_store
        self.mask_kwargs = dict(special_token_ids=tuple(store.special_token_ids), mask_token_id=store.mask_token_id,
                                vocab_size=self.config["vocab_size"], mlm_probability=cfg.mlm_probability,
                                max_predictions=self.plan.prediction_slots, rows_per_group=self.plan.rows_per_group)
        self._step, self.batch_sharding = jit_train_step(self.model, self.tx, self.schedule, self.mesh,
                                                         self.state_sharding, pad_token_id=store.pad_token_id,
                                                         mask_kwargs=self.mask_kwargs)
        # Each step's masking and dropout draw from fold_in(rng, step) (the initial weights
        # always from the seed's Threefry key, so --prng-impl changes only the per-step draws).
        self.rng = jax.random.key(cfg.seed, impl=cfg.prng_impl)
        self._eval_step = None  # built on first use, then reused
        self.tokens_offset = 0  # tokens of the stages before this run (mlmtool.stages)
        self.started_from: dict | None = None  # where this run's stage started, if from a checkpoint
        self._new_stage = False

    def _settings(self) -> dict:
        """What must be the same on every process of a multi-process run (see dist.agree)."""
        return {**{f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(self.cfg).items()},
                "mesh": dict(self.mesh.shape), "config.json": self.config,
                "data": blocks.store_fingerprint(self.train_store, self.val_store)}

    # -- checkpoint metadata: what must match for a resume to continue the same run --
    def _run_identity(self) -> dict:
        return {"seed": self.cfg.seed, "global_batch": self.plan.global_batch,
                "per_device_train_batch_size": self.cfg.per_device_train_batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "devices": self.plan.devices, "train_blocks": self.plan.train_blocks,
                "seq_len": self.plan.seq_len}

    def _meta(self, step: int) -> dict:
        epoch, pos = divmod(step, self.plan.steps_per_epoch)
        return {"step": step, "epoch": epoch, "position_in_epoch": pos,
                "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),  # each step uses fold_in(rng, step)
                "run": self._run_identity(), "train_config": dataclasses.asdict(self.cfg), "config": self.config,
                "total_steps": self.plan.total_steps, "tokens_seen": self._tokens_seen(step),
                "started_from": self.started_from}

    def _tokens_seen(self, step: int) -> int:
        return self.tokens_offset + step * self.plan.tokens_per_step

    def initial_state(self, resume: bool, force: bool, say, from_checkpoint: str | None = None,
                      keep_optimizer_state: bool = False) -> tuple[TrainState, int]:
        if from_checkpoint is not None:
            return self._start_stage(from_checkpoint, keep_optimizer_state, say), 0
        ckpt_dir = self.mdir.checkpoints_dir
        latest, error = None, None
        try:
            latest = checkpoint.latest_step(ckpt_dir)
        except Exception as e:
            error = e
        dist.agree(None if error else {"--resume": resume, "--force": force, "latest checkpoint": latest}, error=error,
                 what="checkpoints", hint=f"start every process with the same options; {ckpt_dir} must be one "
                                          "directory that every host shares (NFS, GCS-fuse, ...)")
        if latest is not None and not resume:
            if not force:
                raise TrainingError(f"{ckpt_dir} holds checkpoints up to step {latest}",
                                    "drop --no-resume to continue that run, or add --force to delete them and "
                                    "start over")
            error = None
            try:
                if self.main:
                    checkpoint.remove_all(ckpt_dir)
            except Exception as e:
                error = e
            dist.agree(error=error)  # also a barrier: no process looks at the directory before it is gone
            latest = None
        if latest is None:
            from mlmtool.init_from import exported_params, initial_params

            params = initial_params(self.mdir, self.mcfg, say)  # weights of 'mlmtool init DIR --from PATH'
            if params is None:  # a save_pretrained directory: continue from its weights, never overwrite them
                params = exported_params(self.mdir, self.mcfg, resume=resume, force=force, say=say)
            if params is not None:
                params = jax.device_put(params, self.state_sharding.params)
                opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
                return TrainState(step=jax.device_put(jnp.int32(0), self.state_sharding.step), params=params,
                                  opt_state=opt_state), 0
            return self._init_state(jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 0xC0FFEE)), 0
        meta = checkpoint.restore_meta(ckpt_dir, latest)
        checkpoint.check_fits(ckpt_dir, latest, self.abstract_state.params)  # config.json changed?
        checkpoint.check_config(ckpt_dir, latest, meta, self.config)
        before, now = meta.get("run", {}), self._run_identity()
        changed = [k for k in ("seed", "global_batch", "train_blocks", "seq_len") if before.get(k) != now[k]]
        if changed:
            was = ", ".join(f"{k}={before.get(k)}" for k in changed)
            now_ = ", ".join(f"{k}={now[k]}" for k in changed)
            raise TrainingError(
                f"the checkpoint at step {latest} was trained with {was}, this run has {now_}",
                "use the same settings to resume, or --no-resume --force to start over")
        with checkpoint.manager(ckpt_dir, async_save=False) as mngr:
            out = checkpoint.restore(mngr, latest, self.abstract_state.params, self.abstract_state.opt_state,
                                     config=self.config)
        state = TrainState(step=jax.device_put(jnp.int32(latest), self.state_sharding.step),
                           params=out["params"], opt_state=out["opt_state"])
        self.started_from = meta.get("started_from")
        self.tokens_offset = (self.started_from or {}).get("tokens_seen", 0)
        say(f"Resuming from checkpoint step {latest:,} (of {self.plan.total_steps:,}) in {ckpt_dir}")
        return state, latest

    def _start_stage(self, source: str, keep_optimizer_state: bool, say) -> TrainState:
        """A new run from another run's checkpoint (mlmtool.stages): its weights, and with
        ``keep_optimizer_state`` its optimizer moments; the stage before is archived."""
        from mlmtool import stages

        src, error = None, None
        try:
            src = stages.resolve(source, self.mdir)
            meta = checkpoint.restore_meta(*src)
            if keep_optimizer_state:
                was = (meta.get("train_config") or {}).get("optimizer", "adamw")
                if was != self.cfg.optimizer:
                    raise TrainingError(f"--keep-optimizer-state: checkpoint step {src[1]} holds the state of "
                                        f"--optimizer {was}, this run has --optimizer {self.cfg.optimizer}",
                                        f"use --optimizer {was}, or drop --keep-optimizer-state")
        except Exception as e:
            error = e
        dist.agree(None if error else {"--from-checkpoint": [str(src[0].absolute()), src[1]]}, error=error,
                 what="--from-checkpoint", hint="start every process with the same options")
        (src_dir, step), own = src, src[0].absolute() == self.mdir.checkpoints_dir.absolute()
        error = moved = None
        try:
            moved = stages.archive(self.mdir, self.main)
        except Exception as e:
            error = e
        dist.agree(error=error)  # a barrier too: nobody reads the checkpoints while they move
        src_dir = moved if own else src_dir
        with checkpoint.manager(src_dir, read_only=True, async_save=False) as mngr:
            out = checkpoint.restore(mngr, step, self.abstract_state.params,
                                     self.abstract_state.opt_state if keep_optimizer_state else None,
                                     config=self.config)
        params = out["params"]
        opt_state = out["opt_state"] if keep_optimizer_state else \
            jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        run = meta.get("run", {})
        tokens = meta.get("tokens_seen", step * run.get("global_batch", 0) * run.get("seq_len", 0))
        self.tokens_offset, self._new_stage = int(tokens), True
        self.started_from = {"checkpoint": str(Path(src_dir).absolute() / str(step)), "step": step,
                             "tokens_seen": int(tokens), "optimizer_state": keep_optimizer_state}
        where = (f"step {step:,} of the run before (its checkpoints are kept in {moved})" if own else
                 f"checkpoint step {step:,} in {src_dir}"
                 + (f" (DIR's checkpoints are kept in {moved})" if moved else ""))
        say(f"New stage from {where}, {tokens:,} tokens seen, "
            + ("with its optimizer state" if keep_optimizer_state else "with a fresh optimizer state"))
        return TrainState(step=jax.device_put(jnp.int32(0), self.state_sharding.step), params=params,
                          opt_state=opt_state)

    def evaluate(self, params) -> dict:
        if self._eval_step is None:
            self._eval_step = make_eval_fn(self.model, self.mesh, self.state_sharding.params, store=self.val_store,
                                           mlm_probability=self.cfg.mlm_probability,
                                           vocab_size=self.config["vocab_size"],
                                           baseline_token=unigram_top_token(self.train_store))
        per_device = self.cfg.per_device_eval_batch_size or self.cfg.per_device_train_batch_size
        return evaluate(params, step=self._eval_step, mesh=self.mesh, store=self.val_store,
                        per_device_batch_size=per_device)

    def run(self, *, resume: bool = True, force: bool = False, progress=None, say=print,
            stop_requested=lambda: False, on_start=None, from_checkpoint: str | None = None,
            keep_optimizer_state: bool = False) -> dict:
        """Train to ``plan.total_steps``; returns the last logged metrics and eval results.
        ``on_start()`` runs once the starting state is settled (a refused run never calls it).
        ``from_checkpoint`` starts a new stage from that checkpoint (mlmtool.stages)."""
        from mlmtool.hf_weights import save_safetensors
        from mlmtool.progress import MetricsWriter

        cfg, plan = self.cfg, self.plan
        state, start = self.initial_state(resume, force, say, from_checkpoint, keep_optimizer_state)
        if on_start is not None:
            on_start()
        if progress is not None:
            progress.started(start)
        writer = MetricsWriter(self.mdir.metrics_path, enabled=self.main, tensorboard_dir=self.mdir / "tensorboard")
        result: dict = {"start_step": start, "total_steps": plan.total_steps}
        if start >= plan.total_steps:
            say(f"Training already complete at step {start:,}.")
        loader = BatchLoader(self.train_store, accum=cfg.gradient_accumulation_steps,
                             micro_batch=plan.global_batch // cfg.gradient_accumulation_steps, seed=cfg.seed,
                             steps_per_epoch=plan.steps_per_epoch, sharding=self.batch_sharding,
                             start=start, stop=plan.total_steps)
        window: list[dict] = []
        window_start = time.perf_counter()
        window_steps = 0
        step = start
        stopped_early = False
        with checkpoint.manager(self.mdir.checkpoints_dir, max_to_keep=cfg.save_total_limit) as mngr:
            if self._new_stage:  # a stage interrupted before its first checkpoint resumes where it started
                checkpoint.save(mngr, 0, state.params, state.opt_state, self._meta(0))
                self._new_stage = False
            try:
                for step, batch in loader:
                    state, metrics = self._step(state, batch, self.rng)
                    window.append(metrics)
                    window_steps += 1
                    done = step + 1
                    if done == start + 1:  # exclude compilation from throughput
                        jax.block_until_ready(metrics)
                        result["compile_seconds"] = time.perf_counter() - window_start
                        if progress is not None:
                            progress.message(f"compiled and ran the first step in {result['compile_seconds']:.1f} s")
                            progress.started(done)
                        window_start, window_steps = time.perf_counter(), 0
                    last = done == plan.total_steps
                    stop = stop_requested()
                    if self.multi:  # a signal to one process stops them all, at the same step
                        stop = not last and (done % STOP_CHECK_EVERY == 0 or done % cfg.logging_steps == 0) \
                            and dist.any_process(stop)
                    if progress is not None:
                        progress.step(done)
                    if done % cfg.logging_steps == 0 or done % cfg.save_steps == 0 or last or stop:
                        if window:
                            record = self._flush(window, done, window_start, window_steps, mngr)
                            window, window_steps, window_start = [], 0, time.perf_counter()
                            writer.write(record)
                            if progress is not None:
                                progress.log(record)
                            result["train"] = record
                    if self.val_store is not None and cfg.eval_steps and done % cfg.eval_steps == 0 and not last:
                        ev = self.evaluate(state.params)
                        writer.write({"step": done, **ev})
                        if progress is not None:
                            progress.message(_format_eval(done, ev))
                        window_start = time.perf_counter()
                    if done % cfg.save_steps == 0 or last or stop:
                        checkpoint.save(mngr, done, state.params, state.opt_state, self._meta(done))
                    if stop and not last:
                        stopped_early = True
                        break
            finally:
                loader.close()
                checkpoint.wait(mngr)
        result["stopped_early"] = stopped_early
        result["final_step"] = int(jax.device_get(state.step))
        if stopped_early:
            return result
        if self.val_store is not None:
            ev = self.evaluate(state.params)
            writer.write({"step": result["final_step"], **ev})
            if progress is not None:
                progress.message(_format_eval(result["final_step"], ev))
            result["eval"] = ev
        params = jax.device_get(state.params) if jax.process_count() == 1 else _gather(state.params)
        if self.main:
            save_safetensors(params, self.mcfg, self.mdir.weights_path)
        result["exported"] = str(self.mdir.weights_path)
        return result

    def _diverged(self, step: int, loss: float, lr: float, mngr) -> None:
        """Stop on inf/nan: name the step and the likely cause; no checkpoint of it is written."""
        last_good = mngr.latest_step()
        keep = (f"the last good checkpoint (step {last_good}) is kept and training resumes from it"
                if last_good is not None else "no checkpoint was written; training starts over")
        what = f"the loss became {loss}" if not math.isfinite(loss) else "the weights became inf/nan"
        clip = ", clip gradients with --max-grad-norm 1.0" if not self.cfg.max_grad_norm > 0 else ""
        raise TrainingError(
            f"training diverged at step {step}: {what}",
            f"the learning rate ({lr:.2e} at that step) is probably too high: lower --learning-rate, "
            f"raise --warmup-steps{clip}; {keep}")

    def _flush(self, window: list[dict], done: int, window_start: float, window_steps: int, mngr) -> dict:
        got = jax.device_get(window)
        loss_sum = sum(float(m["loss_sum"]) for m in got)
        denom = sum(float(m["denominator"]) for m in got)
        loss = loss_sum / max(denom, 1.0)
        if denom == 0:  # a loss of 0 over nothing: not a perfect model
            raise TrainingError(
                f"no token was chosen for prediction in steps {done - len(got) + 1}..{done}: the loss would read 0",
                f"the blocks hold only special tokens, or --mlm-probability ({self.cfg.mlm_probability}) is too "
                f"small: prepare with a larger --max-seq-length ('mlmtool prepare {self.mdir} FILE... --force')")
        for i, m in enumerate(got):  # before any checkpoint of these steps is written
            step_loss = float(m["loss_sum"]) / max(float(m["denominator"]), 1.0)
            if not (math.isfinite(step_loss) and bool(m.get("finite", True))):
                self._diverged(done - len(got) + i + 1, step_loss, float(m["learning_rate"]), mngr)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        tokens = window_steps * self.plan.tokens_per_step
        tokens_per_second = tokens / elapsed if window_steps else 0.0
        mfu = {}
        if self.plan.peak_flops:  # model-FLOPs utilisation of the devices (mlmtool.flops)
            mfu["mfu"] = tokens_per_second * self.plan.flops_per_token / (self.plan.peak_flops * self.plan.devices)
        return {
            "step": done,
            "epoch": done / self.plan.steps_per_epoch,
            "loss": loss,
            "accuracy": sum(float(m["accuracy_sum"]) for m in got) / max(denom, 1.0),
            "learning_rate": float(got[-1]["learning_rate"]),
            "grad_norm": float(got[-1]["grad_norm"]),
            "tokens_per_second": tokens_per_second,
            **mfu,
            "masked_tokens": int(denom),
            "tokens_seen": self._tokens_seen(done),
            "time": time.time(),
        }


def _gather(tree):
    """Fully replicate a (possibly sharded, multi-process) pytree and fetch it to the host."""
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _format_eval(step: int, ev: dict) -> str:
    return (f"eval @ step {step:,}: loss {ev['eval_loss']:.4f} | accuracy {ev['eval_accuracy']:.4f} | "
            f"perplexity {ev['perplexity']:.2f} | {ev['eval_tokens']:,} predicted tokens "
            f"(unigram baseline accuracy {ev['eval_unigram_baseline_accuracy']:.4f})")
