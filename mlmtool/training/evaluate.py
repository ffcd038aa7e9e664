"""Evaluation: MLM loss, accuracy and perplexity on the whole validation split.

Every block is scored: the last partial batch is filled with all-padding rows, which
masking never chooses, so they carry zero weight instead of being dropped.  Each row's
masking key is ``fold_in(key(eval_seed), row_index)``, so results do not depend on the
batch size or device count, and two evaluations of the same parameters agree exactly.
Loss and accuracy are token-weighted means over all chosen positions (sums and a
denominator, reduced across the whole global batch); perplexity is ``exp(loss)``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.training import checkpoint as ckpt
from mlmtool.runtime import distributed as dist, sharding as sh
from mlmtool.atomic import atomic_write_json
from mlmtool.data.blocks import store_fingerprint
from mlmtool.constants import EVAL_MLM_PROBABILITY
from mlmtool.errors import CheckpointError, DataError
from mlmtool.training.masking import mask_rows
from mlmtool.models import load_model
from mlmtool.models.layers import document_segments
from mlmtool.training.objectives import MaskedLM, objective_for
from mlmtool.runtime.progress import MetricsWriter
from mlmtool.data.stores import document_starts, open_stores, word_boundaries_for
from mlmtool.training.train_config import check_eval_options, document_attention_for, recorded_train_config

EVAL_SEED = 1234  # fixed, so evaluations are comparable across runs and checkpoints


MLM = MaskedLM()


def eval_step(params: Any, batch, row_ids: jax.Array, *, model, pad_token_id: int,
              mask_kwargs: dict, seed: int, baseline_token: int = -1, documents: bool = False,
              objective=MLM) -> dict:
    """Sums for one batch: rows ``batch`` [B, L] (with ``documents``: the pair of them and
    their document starts) with global row numbers ``row_ids`` [B].

    ``baseline_sum`` counts the predicted positions whose label is ``baseline_token`` (the
    most frequent training token): the accuracy of the unigram baseline on the same masks.
    ``documents``: document attention (``mlmtool.training.step.train_step``); ``objective``
    (``mlmtool.training.objectives``) the forward passes and their sums."""
    input_ids, starts = batch if documents else (batch, None)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(row_ids)  # [B, 2]
    masked = mask_rows(keys, input_ids, **mask_kwargs)
    segments = {} if starts is None else {"segment_ids": document_segments(starts, input_ids, pad_token_id)}  # [B, L]
    sums = objective.eval_sums(model, params, masked, input_ids, keys, attention_mask=(input_ids != pad_token_id),
                               documents=segments)
    baseline_sum = jnp.sum((masked.masked_labels == baseline_token) * masked.masked_weights)
    return {**sums, "denominator": jnp.sum(masked.masked_weights), "baseline_sum": baseline_sum}


def unigram_top_token(store, max_blocks: int = 20_000) -> int:
    """The most frequent non-special token of ``store`` (from up to ``max_blocks`` evenly
    spaced blocks): the unigram baseline predicts it at every masked position."""
    n = len(store)
    idx = np.unique(np.linspace(0, n - 1, num=min(n, max_blocks)).astype(np.int64))
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for start in range(0, len(idx), 1024):
        rows = store.read(idx[start:start + 1024]).ravel()
        counts += np.bincount(rows, minlength=store.vocab_size)[:store.vocab_size]
    counts[list(store.special_token_ids)] = 0
    return int(np.argmax(counts))


def make_eval_fn(model, mesh, params_sharding, *, store, mlm_probability: float, vocab_size: int,
                 seed: int = EVAL_SEED, baseline_token: int = -1, masking: str = "token", word_boundaries=None,
                 documents: bool = False, objective=MLM) -> Callable:
    mask_kwargs = dict(special_token_ids=tuple(store.special_token_ids), mask_token_id=store.mask_token_id,
                       vocab_size=vocab_size, mlm_probability=mlm_probability, max_predictions=None,
                       masking=masking, word_boundaries=word_boundaries)
    fn = partial(eval_step, model=model, pad_token_id=store.pad_token_id, mask_kwargs=mask_kwargs, seed=seed,
                 baseline_token=baseline_token, documents=documents, objective=objective)
    rows_sh = sh.batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(params_sharding, rows_sh, rows_sh), out_shardings=sh.replicated(mesh))


def evaluate(params: Any, *, step: Callable, mesh, store, per_device_batch_size: int,
             on_batch: Callable[[int], None] | None = None, objective=MLM, documents: bool = False) -> dict:
    """HF-named metrics over every block of ``store``; ``step`` comes from :func:`make_eval_fn`
    (built once and reused, so repeated evaluations do not recompile; ``documents`` as it was
    built with: the batches carry their document starts)."""
    global_batch = per_device_batch_size * mesh.size
    rows_sh = sh.batch_sharding(mesh)
    my_rows = sh.process_rows(rows_sh, (global_batch, store.seq_len))
    n = len(store)
    totals = None
    for start in range(0, n, global_batch):
        row_ids = np.arange(start, start + global_batch, dtype=np.int64)[my_rows]  # [local rows]
        valid = row_ids < n
        ids = np.full((len(row_ids), store.seq_len), store.pad_token_id, dtype=np.int32)  # padding rows
        starts = np.zeros(ids.shape, dtype=bool)
        if valid.any() and documents:
            ids[valid], starts[valid] = store.read_documents(row_ids[valid])
        elif valid.any():
            ids[valid] = store.read(row_ids[valid])
        batch = jax.tree_util.tree_map(lambda x: sh.global_array(x, rows_sh, (global_batch, store.seq_len)),
                                       (ids, starts) if documents else ids)
        out = step(params, batch, sh.global_array(row_ids.astype(np.int32), rows_sh, (global_batch,)))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
        if on_batch is not None:
            on_batch(min(start + global_batch, n) - start)
    totals = jax.device_get(totals) if totals is not None else {
        "loss_sum": 0.0, "accuracy_sum": 0.0, "denominator": 0.0, "baseline_sum": 0.0}
    denom = float(totals["denominator"])
    loss = float(totals["loss_sum"]) / max(denom, 1.0)
    return {
        "eval_loss": loss,
        "eval_accuracy": float(totals["accuracy_sum"]) / max(denom, 1.0),
        "perplexity": math.exp(min(loss, 700.0)),
        "eval_tokens": int(denom),
        "eval_samples": n,
        "eval_unigram_baseline_accuracy": float(totals["baseline_sum"]) / max(denom, 1.0),
        **objective.eval_results(totals),
    }


def check_results(results: dict, mdir, source: str) -> None:
    """A loss over no predicted token, or a nan, is no result: never written as one."""
    if results["eval_tokens"] == 0:
        raise DataError(f"the {results['eval_samples']:,} validation blocks in {mdir.data_dir} hold no token to "
                        "predict (only special tokens or padding): the loss would read 0",
                        "prepare blocks with text in them: "
                        f"'{mdir.prepare_command('--max-seq-length', 'N', '--force')}' with a larger N")
    if not (math.isfinite(results["eval_loss"]) and math.isfinite(results["eval_accuracy"])):
        raise CheckpointError(f"the evaluation of {source} computed a loss of {results['eval_loss']}: its weights "
                              "hold inf or nan (or overflow in bfloat16)",
                              "evaluate another checkpoint (--checkpoint STEP), use --dtype float32, or train again")


def default_batch_size(recorded: dict) -> int:
    """The per-device eval batch of DIR's latest training run (``recorded``:
    ``train_config.recorded_train_config``), so that an eval after training loads the
    program training compiled, from the compilation cache; else 64."""
    size = recorded.get("per_device_eval_batch_size") or recorded.get("per_device_train_batch_size")
    return size if isinstance(size, int) and size > 0 else 64


def run_eval(mdir, *, checkpoint: str = "latest", per_device_batch_size: int | None = None,
             mlm_probability: float = EVAL_MLM_PROBABILITY, dtype: str = "float32", mesh_spec: str | None = None,
             masking: str = "token", document_attention: bool | None = None) -> dict:
    """Evaluate DIR's model on its validation split and write eval_results.json
    (``per_device_batch_size`` None: :func:`default_batch_size`; ``document_attention``
    None: as DIR's latest training run, ``train_config.document_attention_for``)."""
    check_eval_options(per_device_eval_batch_size=per_device_batch_size, mlm_probability=mlm_probability,
                       dtype=dtype, masking=masking)
    error = None
    try:  # everything that can fail on one host alone, before any collective
        recorded, _ = recorded_train_config(mdir)
        if per_device_batch_size is None:
            per_device_batch_size = default_batch_size(recorded)
        config = mdir.read_config()
        loaded = load_model(config, dtype=dtype)
        objective = objective_for(loaded)
        mesh = sh.make_mesh(mesh_spec)
        params_sharding = sh.state_shardings(mesh, loaded.abstract_params, loaded.param_axes)
        selected = ckpt.select_checkpoint(mdir, checkpoint)
        # On every process: opening the checkpoints is collective.
        if isinstance(selected, int):  # a changed config.json is the cause to name, before the data's checks
            ckpt.check_config(mdir.checkpoints_dir, selected, ckpt.restore_meta(mdir.checkpoints_dir, selected),
                              config)
        train_store, store = open_stores(mdir, config, what="eval")
        weights_step = ckpt.weights_step(mdir, selected)  # for the TensorBoard event
        baseline_token = unigram_top_token(train_store)
        documents = document_attention_for(loaded.family, document_attention, recorded.get("document_attention"))
        word_table = word_boundaries_for(mdir, config["vocab_size"]) if masking != "token" else None
    except Exception as e:  # fail on every process together, not on one while the others wait
        error = e
    dist.agree(None if error else {
        "checkpoint": selected, "--per-device-eval-batch-size": per_device_batch_size,
        "--mlm-probability": mlm_probability, "--masking": masking, "--document-attention": documents,
        "--dtype": dtype, "mesh": dict(mesh.shape), "config.json": config,
        "data": store_fingerprint(train_store, store)}, error=error, what="evaluation settings",
        hint="start every process with the same options on the same model directory")
    error = None
    try:
        params, source = ckpt.load_params(mdir, loaded, "export" if selected is None else str(selected), mesh,
                                          params_sharding, config=config)
    except Exception as e:
        error = e
    dist.agree(error=error)
    step = make_eval_fn(loaded.module, mesh, params_sharding, store=store, mlm_probability=mlm_probability,
                        vocab_size=train_store.vocab_size, baseline_token=baseline_token, masking=masking,
                        word_boundaries=word_table, documents=document_starts(store, documents),
                        objective=objective)
    results = evaluate(params, step=step, mesh=mesh, store=store, per_device_batch_size=per_device_batch_size,
                       objective=objective, documents=document_starts(store, documents))
    results["checkpoint"] = source
    results.update(masking=masking, mlm_probability=mlm_probability, document_attention=documents,
                   data=mdir.data)  # the block store: report keeps each store's results apart
    check_results(results, mdir, source)
    if sh.is_main_process():
        atomic_write_json(mdir.eval_results_path, results)
        record = {"event": "eval", "checkpoint": source, **results}
        if weights_step is not None:
            record["step"] = weights_step
        MetricsWriter(mdir.metrics_path, tensorboard_dir=mdir.tensorboard_dir).write(record)
    return results
