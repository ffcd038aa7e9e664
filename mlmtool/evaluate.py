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

from mlmtool.constants import DTYPES, EVAL_MLM_PROBABILITY
from mlmtool.masking import MODES, mask_rows
from mlmtool.models.layers import document_segments
from mlmtool.objectives import MaskedLM, mlm_sums  # noqa: F401 (mlm_sums: where it was)

EVAL_SEED = 1234  # fixed, so evaluations are comparable across runs and checkpoints


MLM = MaskedLM()


def eval_step(params: Any, batch, row_ids: jax.Array, *, model, pad_token_id: int,
              mask_kwargs: dict, seed: int, baseline_token: int = -1, documents: bool = False,
              objective=MLM) -> dict:
    """Sums for one batch: rows ``batch`` [B, L] (with ``documents``: the pair of them and
    their document starts) with global row numbers ``row_ids`` [B].

    ``baseline_sum`` counts the predicted positions whose label is ``baseline_token`` (the
    most frequent training token): the accuracy of the unigram baseline on the same masks.
    ``documents``: document attention (``mlmtool.step.train_step``); ``objective``
    (``mlmtool.objectives``) the forward passes and their sums."""
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
    from mlmtool import sharding as sh

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
    from mlmtool import sharding as sh

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


INIT = "init"  # --checkpoint init: the starting weights 'init --from' wrote (init.safetensors)


def select_checkpoint(mdir, which: str) -> int | str | None:
    """The checkpoint that ``which`` (``latest``, ``export``, ``init`` or a step number)
    names: a step, None for the export (model.safetensors) or ``INIT`` for the weights
    ``init --from`` wrote; CheckpointError if there is none.  ``latest`` falls back to the
    export, then (before any training of an ``init --from`` directory) to those weights."""
    from mlmtool import checkpoint
    from mlmtool.errors import CheckpointError

    if which == INIT:
        if not mdir.init_weights_path.exists():
            raise CheckpointError(f"{mdir.init_weights_path} does not exist",
                                  f"it is written by 'mlmtool init {mdir} --from MODEL_DIR'")
        return INIT
    steps = checkpoint.all_steps(mdir.checkpoints_dir)
    if which == "export" or (which == "latest" and not steps):
        if mdir.weights_path.exists():
            return None
        if which == "latest" and mdir.init_weights_path.exists():
            return INIT
        raise CheckpointError(f"no trained model in {mdir}", f"run 'mlmtool train {mdir}' first")
    if which == "latest":
        step = steps[-1]
    else:
        try:
            step = int(which)
        except ValueError:
            raise CheckpointError(f"--checkpoint {which!r} is not latest, export, init or a step number",
                                  "e.g. --checkpoint latest") from None
        if step not in steps:
            from mlmtool.stages import numbers

            earlier = [f"stage {n}'s {mdir.stages_dir / str(n) / 'checkpoints'} has steps "
                       + ", ".join(map(str, checkpoint.all_steps(mdir.stages_dir / str(n) / "checkpoints")))
                       for n in numbers(mdir.stages_dir)]
            raise CheckpointError(f"no checkpoint at step {step} in {mdir.checkpoints_dir} (the current stage)",
                                  f"available: {', '.join(map(str, steps)) or 'none'}"
                                  + (f"; eval reads the current stage only, not the earlier ones ({'; '.join(earlier)})"
                                     if earlier else ""))
    return step


def load_params(mdir, loaded, which: str, mesh, params_sharding, config: dict | None = None) -> tuple[Any, str]:
    """Parameters of ``loaded`` (a ``mlmtool.models.LoadedModel``) from a checkpoint
    (``latest`` or a step number), the export or ``init``."""
    from mlmtool import checkpoint
    from mlmtool.init_from import initial_params

    step = select_checkpoint(mdir, which)
    if step == INIT:
        return jax.device_put(initial_params(mdir, loaded), params_sharding), "init (before training)"
    if step is None:
        params = loaded.load_hf(mdir.weights_path)
        return jax.device_put(params, params_sharding), "export"
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      loaded.abstract_params, params_sharding)
    with checkpoint.manager(mdir.checkpoints_dir, read_only=True, async_save=False) as mngr:
        out = checkpoint.restore(mngr, step, abstract, config=config)
    return out["params"], f"step {step}"


def check_options(*, per_device_batch_size: int, mlm_probability: float, dtype: str, masking: str = "token") -> None:
    """eval's options, before any work: a loss over no predicted token would read as perfect."""
    from mlmtool.errors import ConfigError
    from mlmtool.masking import MAX_SPAN_RATE

    if masking not in MODES:
        raise ConfigError(f"--masking must be one of {', '.join(MODES)}, got {masking!r}", "use --masking token")
    if masking == "span" and mlm_probability > MAX_SPAN_RATE:
        raise ConfigError(f"span masking leaves at least one word between spans: its rate is at most "
                          f"{MAX_SPAN_RATE:.2f}", "lower --mlm-probability")
    if not 0.0 < mlm_probability < 1.0:
        raise ConfigError(f"--mlm-probability must be in (0, 1), got {mlm_probability}",
                          "with nothing masked there is nothing to evaluate: use e.g. 0.15 (the default)")
    if per_device_batch_size < 1:
        raise ConfigError(f"--per-device-eval-batch-size must be positive, got {per_device_batch_size}",
                          "use e.g. 64")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}", "use --dtype float32")


def check_results(results: dict, mdir, source: str) -> None:
    """A loss over no predicted token, or a nan, is no result: never written as one."""
    from mlmtool.errors import CheckpointError, DataError

    if results["eval_tokens"] == 0:
        raise DataError(f"the {results['eval_samples']:,} validation blocks in {mdir.data_dir} hold no token to "
                        "predict (only special tokens or padding): the loss would read 0",
                        "prepare blocks with text in them: "
                        f"'{mdir.prepare_command('--max-seq-length', 'N', '--force')}' with a larger N")
    if not (math.isfinite(results["eval_loss"]) and math.isfinite(results["eval_accuracy"])):
        raise CheckpointError(f"the evaluation of {source} computed a loss of {results['eval_loss']}: its weights "
                              "hold inf or nan (or overflow in bfloat16)",
                              "evaluate another checkpoint (--checkpoint STEP), use --dtype float32, or train again")


def recorded_train_config(mdir) -> dict:
    """The training settings recorded in DIR's latest checkpoint ({} if none or unreadable)."""
    from mlmtool import checkpoint as ckpt

    try:
        latest = ckpt.latest_step(mdir.checkpoints_dir)
        meta = ckpt.restore_meta(mdir.checkpoints_dir, latest) if latest is not None else {}
        recorded = meta.get("train_config") or {}
    except Exception:  # a damaged checkpoint is reported where the weights are read
        recorded = {}
    return recorded if isinstance(recorded, dict) else {}


def default_batch_size(mdir) -> int:
    """The per-device eval batch of DIR's latest training run (so that an eval after training
    loads the program training compiled, from the compilation cache), else 64."""
    recorded = recorded_train_config(mdir)
    size = recorded.get("per_device_eval_batch_size") or recorded.get("per_device_train_batch_size")
    return size if isinstance(size, int) and size > 0 else 64


def document_attention_as_trained(mdir, family, requested: bool | None) -> bool:
    """Whether eval uses document attention: ``requested`` when given, else as DIR's latest
    training run did (its recorded setting, else the family's default).  A model trained
    with it has only ever seen one document at a time: scoring its packed validation blocks
    with cross-document attention would measure something it was not trained for (and
    inference, one document per row, never does); a model trained across documents is
    scored as it was trained."""
    from mlmtool.errors import ConfigError

    if requested is None:
        requested = recorded_train_config(mdir).get("document_attention")
    on = family.document_attention_default if requested is None else bool(requested)
    if on and not family.document_attention:
        raise ConfigError(f"the {family.name} family's network does not implement document attention",
                          "drop --document-attention")
    return on


def run_eval(mdir, *, checkpoint: str = "latest", per_device_batch_size: int | None = None,
             mlm_probability: float = EVAL_MLM_PROBABILITY, dtype: str = "float32", mesh_spec: str | None = None,
             masking: str = "token", document_attention: bool | None = None) -> dict:
    """Evaluate DIR's model on its validation split and write eval_results.json
    (``per_device_batch_size`` None: :func:`default_batch_size`; ``document_attention``
    None: :func:`document_attention_as_trained`)."""
    from mlmtool import distributed as dist, sharding as sh
    from mlmtool.blocks import store_fingerprint
    from mlmtool.models import load_model
    from mlmtool.modeldir import atomic_write_json
    from mlmtool.objectives import objective_for
    from mlmtool.stores import document_starts, open_stores, word_boundaries_for

    check_options(per_device_batch_size=1 if per_device_batch_size is None else per_device_batch_size,
                  mlm_probability=mlm_probability, dtype=dtype, masking=masking)
    error = None
    try:  # everything that can fail on one host alone, before any collective
        if per_device_batch_size is None:
            per_device_batch_size = default_batch_size(mdir)
        config = mdir.read_config()
        loaded = load_model(config, dtype=dtype)
        objective = objective_for(loaded)
        mesh = sh.make_mesh(mesh_spec)
        params_sharding = sh.state_shardings(mesh, loaded.abstract_params, loaded.param_axes)
        selected = select_checkpoint(mdir, checkpoint)
        # The training step the weights are from, for the TensorBoard event (the export is
        # written with the run's last checkpoint).  On every process: opening the
        # checkpoints is collective.
        from mlmtool import checkpoint as ckpt

        if isinstance(selected, int):  # a changed config.json is the cause to name, before the data's checks
            ckpt.check_config(mdir.checkpoints_dir, selected, ckpt.restore_meta(mdir.checkpoints_dir, selected),
                              config)
        train_store, store = open_stores(mdir, config, what="eval")

        weights_step = (selected if isinstance(selected, int) else 0 if selected == INIT
                        else ckpt.latest_step(mdir.checkpoints_dir))
        baseline_token = unigram_top_token(train_store)
        documents = document_attention_as_trained(mdir, loaded.family, document_attention)
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
        params, source = load_params(mdir, loaded, "export" if selected is None else str(selected), mesh,
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
        from mlmtool.progress import MetricsWriter

        record = {"event": "eval", "checkpoint": source, **results}
        if weights_step is not None:
            record["step"] = weights_step
        MetricsWriter(mdir.metrics_path, tensorboard_dir=mdir.tensorboard_dir).write(record)
    return results
