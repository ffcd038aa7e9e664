"""The training step, pure and jitted once: ``train_step(state, batch, rng)`` returns the new
state and loss *sums* with their denominator (the predicted tokens of the whole global
batch, so the loss is a token-weighted mean, not a mean of per-device means), as google/flax
``examples/lm1b``; its randomness is ``fold_in(rng, step)``, so a resumed run repeats
exactly what an uninterrupted one does.  ``build_training`` sets a run up in one pass (the
plan, then the optimizer, the sharded state and the jitted step): what the Trainer and the
benchmarks share.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

import numpy as np

from mlmtool.runtime import sharding as sh
from mlmtool.training.masking import mask_tokens, masking_rate, row_count_variance
from mlmtool.models.layers import document_segments
from mlmtool.training.objectives import MaskedLM, objective_for
from mlmtool.training.optim import make_optimizer, make_schedule
from mlmtool.training.plan import Plan, describe_execution, max_mlm_probability, plan_training
from mlmtool.data.stores import document_starts
from mlmtool.training.train_config import TrainConfig

MLM = MaskedLM()


@flax.struct.dataclass
class TrainState:
    step: jax.Array   # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


# -- the step ------------------------------------------------------------------------------

def train_step(state: TrainState, batch, rng: jax.Array, clock: jax.Array | None = None, *,
               model, tx, schedule, pad_token_id: int, mask_kwargs: dict,
               rate_schedule: tuple[float, int] | None = None,
               documents: bool = False, objective=MLM) -> tuple[TrainState, dict]:
    """One optimizer step over ``batch``, the ids [A, B, L] (A gradient-accumulation
    micro-batches of B rows), with ``documents`` the pair (ids, bool document starts [A, B, L]);
    returns the new state and summed metrics.

    ``clock`` (float32 scalar) is where the learning-rate schedule stands when training
    against a time budget (``--max-time``: the elapsed fraction of the budget times the
    schedule's steps; ``tx`` then takes its learning rate as an injected hyperparameter);
    None: the schedule follows ``state.step``.  ``rate_schedule`` (final rate, total steps):
    the masking rate goes linearly from ``mask_kwargs["mlm_probability"]`` at step 0 to the
    final rate at the last step, computed from ``state.step``.  ``documents`` turns on document
    attention: segment ids from the starts ``prepare`` recorded (``BlockStore.read_documents``).
    ``objective`` (``mlmtool.training.objectives``) computes the
    loss and the summed metrics of each micro-batch."""
    input_ids, starts = batch if documents else (batch, None)
    step_rng = jax.random.fold_in(rng, state.step)
    mask_rng, dropout_rng = jax.random.split(step_rng)
    accum = input_ids.shape[0]
    rate = None
    if rate_schedule is not None:
        rate = masking_rate(state.step, mask_kwargs["mlm_probability"], *rate_schedule)
        mask_kwargs = {**mask_kwargs, "mlm_probability": rate}
    masked = jax.vmap(lambda k, x: mask_tokens(k, x, **mask_kwargs))(
        jax.random.split(mask_rng, accum), input_ids)  # fields [A, B, L] / [A, B, P]
    # Counts over the whole (accumulated, global) batch: each loss is sum / denominator.
    denominators = objective.denominators(masked, input_ids, pad_token_id)

    def loss_fn(params, micro, ids, doc_starts, key):
        segments = {} if doc_starts is None else {
            "segment_ids": document_segments(doc_starts, ids, pad_token_id)}  # [B, L]
        return objective.loss(model, params, micro, ids, key, attention_mask=(ids != pad_token_id),
                              documents=segments, denominators=denominators)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    dropout_keys = jax.random.split(dropout_rng, accum)
    if accum == 1:
        micro = jax.tree_util.tree_map(lambda x: x[0], masked)
        (_, sums), grads = grad_fn(state.params, micro, input_ids[0], None if starts is None else starts[0],
                                   dropout_keys[0])
    else:
        def body(carry, xs):
            grads_acc, sums_acc = carry
            micro, ids, doc_starts, key = xs
            (_, sums), grads = grad_fn(state.params, micro, ids, doc_starts, key)
            grads_acc = jax.tree_util.tree_map(jnp.add, grads_acc, grads)
            return (grads_acc, jax.tree_util.tree_map(jnp.add, sums_acc, sums)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, sums), _ = jax.lax.scan(
            body, (zeros, {k: jnp.float32(0) for k in objective.sum_keys}), (masked, input_ids, starts, dropout_keys))

    opt_state = state.opt_state
    if clock is not None:  # optax.inject_hyperparams' state: set this step's learning rate
        current = opt_state.hyperparams["learning_rate"]
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams,
                                                    "learning_rate": jnp.asarray(schedule(clock), current.dtype)})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        **sums,  # the objective's: loss_sum and accuracy_sum of the MLM, and its own
        **denominators,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step if clock is None else clock),
        # False once the weights hold inf/nan: checked before every checkpoint (periodic.check_window)
        "finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)])),
    }
    if rate is not None:
        metrics["mlm_probability"] = rate
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def build_model(hf_config: dict, cfg: TrainConfig):
    """The network of config.json as ``cfg`` computes it (dtype, gradient checkpointing,
    scanned layers; kernels chosen for the backend by ``mlmtool.runtime.kernels``): a
    ``mlmtool.models.LoadedModel``."""
    from mlmtool.models import load_model

    return load_model(hf_config, dtype=cfg.dtype, remat=cfg.gradient_checkpointing, scan_layers=cfg.scan_layers)


def state_shardings(mesh, abstract_state: TrainState, param_axes: dict) -> TrainState:
    """The state's layout: params and optimizer state by the weight table's logical axes
    (``LoadedModel.param_axes``, ``sharding.RULES``), the step replicated."""
    return TrainState(step=sh.replicated(mesh), params=sh.state_shardings(mesh, abstract_state.params, param_axes),
                      opt_state=sh.state_shardings(mesh, abstract_state.opt_state, param_axes))


def jit_train_step(model, tx, schedule, mesh, state_sharding: TrainState, *, pad_token_id: int,
                   mask_kwargs: dict, clock: bool = False, rate_schedule: tuple[float, int] | None = None,
                   documents: bool = False, objective=MLM):
    """``train_step`` jitted as training runs it: sharded state (donated), the batch [A, B, L]
    (with ``documents``: and its document starts) split over the mesh's batch axes, a
    replicated key (and, with ``clock``, the replicated schedule position of a time budget).
    Returns (step, batch sharding)."""
    batch_sharding = sh.batch_sharding(mesh, leading_dims=1)
    step_fn = partial(train_step, model=model, tx=tx, schedule=schedule, pad_token_id=pad_token_id,
                      mask_kwargs=mask_kwargs, rate_schedule=rate_schedule, documents=documents,
                      objective=objective)
    replicated = sh.replicated(mesh)
    in_shardings = (state_sharding, batch_sharding, replicated) + ((replicated,) if clock else ())
    step = jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,))
    return step, batch_sharding


# -- the set-up ----------------------------------------------------------------------------

VARIANCE_SAMPLE = 1024  # blocks the whole-word and span slots are sized on (a fixed, even sample)


@dataclasses.dataclass(frozen=True)
class Training:
    """Everything a run's steps need, built once by ``build_training``."""

    plan: Plan
    schedule: Callable                # step (or the budget's clock) -> learning rate
    tx: Any                           # the optax optimizer
    state_sharding: TrainState        # NamedShardings of the state
    abstract_state: TrainState        # shapes, dtypes and shardings: what a checkpoint restores into
    init_state: Callable              # jitted rng -> a fresh, sharded TrainState
    step: Callable                    # jitted (state, batch [A, B, L], rng[, clock]) -> (state, metrics)
    batch_sharding: Any
    mask_kwargs: dict                 # masking.mask_tokens' settings, the plan's slots included
    objective: Any                    # mlmtool.training.objectives: MLM, or ELECTRA's replaced-token detection
    row_variance: float | None        # what sized the whole-word/span slots (None: token masking)
    step_kwargs: dict                 # jit_train_step's arguments: to jit the step at another batch

    def state_at(self, step: int, params, opt_state=None) -> TrainState:
        """The state at ``step`` of ``params`` (placed on ``state_sharding.params``) and
        ``opt_state`` (None: a fresh one, ``tx.init``)."""
        if opt_state is None:
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(params)
        return TrainState(step=jax.device_put(jnp.int32(step), self.state_sharding.step), params=params,
                          opt_state=opt_state)

    def step_with_slots(self, max_predictions: int, rows_per_group: int):
        """(step, batch sharding) jitted as ``step`` with another prediction layout (the slots of
        another batch size: ``train --find-max-batch``)."""
        mask_kwargs = {**self.mask_kwargs, "max_predictions": max_predictions, "rows_per_group": rows_per_group}
        return jit_train_step(**{**self.step_kwargs, "mask_kwargs": mask_kwargs})


def build_training(loaded, cfg: TrainConfig, store, mesh, *, n_val: int = 0, word_boundaries=None,
                   document_attention: bool = False) -> Training:
    """Set up ``cfg``'s run of ``loaded`` (a ``mlmtool.models.LoadedModel``) on ``store`` (its
    training blocks: a ``BlockStore``, or anything with its ``seq_len``, ids, ``line_by_line``,
    ``meta``, ``len`` and ``read``) over ``mesh``.  ``n_val``: validation blocks (for the plan);
    ``word_boundaries``: the tokenizer's word-start table (whole-word and span masking);
    ``document_attention``: segment ids from the blocks' document starts."""
    mask_kwargs = dict(special_token_ids=tuple(store.special_token_ids), mask_token_id=store.mask_token_id,
                       vocab_size=store.vocab_size, mlm_probability=cfg.mlm_probability,
                       masking=cfg.masking, word_boundaries=word_boundaries)
    row_variance = None
    if cfg.masking != "token" and not cfg.max_predictions_per_seq:
        # Whole words and spans: slots from the spread measured on a fixed sample of the data.
        n = len(store)
        sample = np.unique(np.linspace(0, n - 1, num=min(n, VARIANCE_SAMPLE)).astype(np.int64))
        row_variance = row_count_variance(store.read(sample),
                                          {**mask_kwargs, "mlm_probability": max_mlm_probability(cfg)})
    devs = sh.device_summary()
    plan = plan_training(cfg, n_train=len(store), n_val=n_val, seq_len=store.seq_len, n_devices=mesh.size,
                         parameters=loaded.parameter_count, mesh=dict(mesh.shape), platform=devs["platform"],
                         processes=devs["processes"], row_variance=row_variance, device_kind=devs["device_kind"],
                         kernels=describe_execution(loaded.module), hf_config=loaded.hf_config,
                         document_attention=document_attention, line_by_line=store.line_by_line)
    mask_kwargs.update(max_predictions=plan.prediction_slots, rows_per_group=plan.rows_per_group)
    schedule = make_schedule(cfg, plan.total_steps, plan.warmup_steps)
    tx = make_optimizer(cfg, schedule, loaded.decay_mask)

    def init_state(rng):
        params = loaded.init(rng)
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

    shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_sharding = state_shardings(mesh, shapes, loaded.param_axes)
    abstract_state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                            shapes, state_sharding)
    rate_schedule = None
    if cfg.mlm_probability_final is not None and cfg.mlm_probability_final != cfg.mlm_probability:
        rate_schedule = (cfg.mlm_probability_final, plan.total_steps)
    objective = objective_for(loaded)
    step_kwargs = dict(model=loaded.module, tx=tx, schedule=schedule, mesh=mesh, state_sharding=state_sharding,
                       pad_token_id=store.pad_token_id, mask_kwargs=mask_kwargs, rate_schedule=rate_schedule,
                       clock=cfg.max_time > 0, documents=document_starts(store, document_attention),
                       objective=objective)
    step, batch_sharding = jit_train_step(**step_kwargs)
    return Training(plan=plan, schedule=schedule, tx=tx, state_sharding=state_sharding,
                    abstract_state=abstract_state, init_state=jax.jit(init_state, out_shardings=state_sharding),
                    step=step, batch_sharding=batch_sharding, mask_kwargs=mask_kwargs, objective=objective,
                    row_variance=row_variance, step_kwargs=step_kwargs)
