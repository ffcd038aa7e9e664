"""Checkpoints with orbax: the one factory for the checkpoint manager, save and restore.

A checkpoint holds three items: ``params`` and ``opt_state`` (saved collectively, each
process writing its own shards) and ``meta`` (JSON: step, seed, data position, the
training arguments that fix the data order).  Evaluation restores ``params`` alone.  Orbax writes each step into
a temporary folder and renames it when complete, so a kill during a save leaves the
previous checkpoint as the latest readable one (the steps are listed without orbax:
``modeldir.checkpoint_steps``).

Which weights eval, predict, export and ``eval --minimal-pairs`` read -- a step, the export or
``init --from``'s -- is chosen here too (:func:`select_checkpoint`, :func:`load_params`).
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mlmtool import models
from mlmtool.errors import CheckpointError, ConfigError
from mlmtool.init_from import initial_params
from mlmtool.modeldir import checkpoint_steps, numbered_folders

ITEMS = ("params", "opt_state", "meta")


def manager(directory: Path, *, max_to_keep: int | None = None, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
    """The project's single orbax CheckpointManager factory."""
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def latest_step(directory: Path) -> int | None:
    """The newest complete checkpoint in ``directory`` (``modeldir.checkpoint_steps``), None if none."""
    steps = checkpoint_steps(directory)
    return steps[-1] if steps else None


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    """Start saving ``step`` (asynchronously); CheckpointError if this or an earlier save failed."""
    try:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                 opt_state=ocp.args.StandardSave(opt_state),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:
        raise save_error(mngr, e, step) from e


def wait(mngr: ocp.CheckpointManager) -> None:
    """Wait for the saves in flight; CheckpointError if one failed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise save_error(mngr, e, None) from e


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= limit else text[:limit] + "..."


def save_error(mngr: ocp.CheckpointManager, e: BaseException, step: int | None) -> CheckpointError:
    """What a failed save means for the user: which step, why (disk full?), what is kept."""
    text = one_line(e)
    remove_temporary(Path(str(mngr.directory)))  # a half-written step would keep the disk full
    m = re.search(r"[/\\](\d+)\.orbax-checkpoint-tmp", str(e))
    if m:
        step = int(m.group(1))
    directory = Path(str(mngr.directory))
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
    try:
        kept = [s for s in checkpoint_steps(directory) if step is None or s < step]
    except Exception:
        kept = []
    where = f"checkpoint step {step}" if step is not None else "a checkpoint"
    resume = (f"'mlmtool train {directory.parent}' resumes from step {kept[-1]}, the last complete checkpoint"
              if kept else f"'mlmtool train {directory.parent}' starts over (no complete checkpoint)")
    if full:
        return CheckpointError(f"cannot save {where} in {directory}: the disk is full",
                               f"free some space, then {resume}")
    return CheckpointError(f"cannot save {where} in {directory} ({e.__class__.__name__}: {text})",
                           f"fix the cause, then {resume}")


def _architecture(config: dict) -> tuple[str, ...]:
    """config.json fields that make the model (not dropout): a checkpoint is read only under
    these (the family's ``architecture_keys``)."""
    try:
        return models.family_for(config.get("model_type")).architecture_keys
    except Exception:  # an unknown model_type: compare what names it
        return ("model_type",)


def _shapes(tree: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def stored_shapes(directory: Path, step: int) -> dict[str, tuple] | None:
    """{parameter path: shape} of checkpoint ``step``, from its metadata alone (None if unreadable)."""
    try:
        with ocp.StandardCheckpointer() as c:
            md = c.metadata(Path(directory).absolute() / str(step) / "params")
        return _shapes(getattr(md, "item_metadata", md))
    except Exception:
        return None


def config_fields(shapes: dict[str, tuple]) -> dict[str, int]:
    """The config.json sizes that parameter shapes imply (vocab_size, hidden_size, ...), as the
    family whose parameter tree this is reads them (``Family.fields_from_shapes``)."""
    found = [family.fields_from_shapes(shapes) for family in models.families().values()]
    return max(found, key=len, default={})


def config_mismatch(directory: Path, step: int, was: dict, now: dict) -> ConfigError:
    """config.json no longer describes checkpoint ``step``: name each field, old -> new, and
    the way back (the checkpoint itself is intact: deleting it would lose good work)."""
    changed = list(was)
    what = ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in changed)
    back = " ".join(f"{k}={was.get(k)}" for k in changed)
    run = Path(directory).parent
    return ConfigError(f"config.json no longer matches checkpoint step {step} in {directory} (the checkpoint is "
                       f"intact): {what} (checkpoint -> config.json)",
                       f"to use the checkpoints, put back {back} in {run / 'config.json'}"
                       + (" (a retrained tokenizer changes vocab_size: put back the old tokenizer files too)"
                          if "vocab_size" in changed else "")
                       + f"; to start a new run with this config instead, 'mlmtool train {run} --no-resume --force'")


def check_fits(directory: Path, step: int, abstract_params: Any, config: dict | None = None) -> None:
    """ConfigError naming the fields if checkpoint ``step`` was made under another config, found
    from its metadata before any array is read (a failed restore reads as damage, and leaves
    orbax's coroutines to complain)."""
    have, want = stored_shapes(directory, step), _shapes(abstract_params)
    if not have or have == want:
        return
    was, now = config_fields(have), config_fields(want)
    changed = sorted(k for k in was.keys() & now.keys() if was[k] != now[k])
    if not changed:  # shapes differ elsewhere: name the first parameter
        changed = [k for k in sorted(have.keys() & want.keys()) if have[k] != want[k]][:1]
        was, now = have, want
    if changed:  # else entries are missing: damage (or another structure), which the restore reports
        raise config_mismatch(Path(directory).absolute(), step, {k: was[k] for k in changed},
                              {k: now[k] for k in changed})


def check_config(directory: Path, step: int, meta: dict, config: dict | None) -> None:
    """ConfigError if the checkpoint's recorded config.json (checkpoints of mlmtool 0.1 and later record it) differs
    from ``config`` in a field that makes the model, e.g. num_attention_heads (same shapes)."""
    recorded = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict) or config is None:
        return
    keys = dict.fromkeys(("model_type", *_architecture(recorded), *_architecture(config)))
    was = {k: recorded.get(k) for k in keys if recorded.get(k) != config.get(k)}
    if was:
        raise config_mismatch(Path(directory).absolute(), step, was, {k: config.get(k) for k in was})


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Any = None, config: dict | None = None) -> dict:
    """Restore ``step`` into arrays laid out like the abstract trees (ShapeDtypeStructs
    with shardings); without ``abstract_opt_state`` only params and meta are read.
    Raises ConfigError naming the fields if config.json (``config``) no longer describes the
    checkpoint, CheckpointError with the fix if the files are damaged."""
    check_fits(Path(str(mngr.directory)), step, abstract_params, config)
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise damaged(Path(str(mngr.directory)), step, e) from e
    check_config(Path(str(mngr.directory)), step, out["meta"], config)
    return dict(out)


def damaged(directory: Path, step: int, e: BaseException) -> CheckpointError:
    """The error for an unreadable checkpoint: which step, and how to go on without it."""
    try:
        earlier = [s for s in checkpoint_steps(directory) if s < step]
    except Exception:
        earlier = []
    fallback = (f"delete {Path(directory) / str(step)} to resume from step {earlier[-1]} (the previous checkpoint)"
                if earlier else f"delete {Path(directory) / str(step)}")
    return CheckpointError(f"checkpoint step {step} in {directory} is damaged or incomplete "
                           f"({e.__class__.__name__}: {one_line(e, 200)})",
                           f"{fallback}, or start over with "
                           f"'mlmtool train {Path(directory).parent} --no-resume --force'")


def restore_meta(directory: Path, step: int) -> dict:
    with manager(directory, read_only=True, async_save=False) as mngr:
        try:
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise damaged(Path(directory).absolute(), step, e) from e


def remove_temporary(directory: Path) -> None:
    """Delete the temporary folders of unfinished saves (``<step>.orbax-checkpoint-tmp*``); on
    process 0 (the others share the directory)."""
    if jax.process_index() != 0 or not Path(directory).is_dir():
        return
    for p in Path(directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)


def remove_all(directory: Path) -> None:
    """Delete every checkpoint in ``directory``; a link made by ``--checkpoint-dir``
    (:mod:`mlmtool.training.checkpoint_dir`) stays, its target emptied but for its owner record."""
    directory = Path(directory)
    if not directory.is_symlink():
        shutil.rmtree(directory, ignore_errors=True)
        return
    from mlmtool.training.checkpoint_dir import OWNER

    for p in directory.iterdir():
        if p.name == OWNER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# -- which weights: eval, predict, export and eval --minimal-pairs select them the same way --------

INIT = "init"  # --checkpoint init: the starting weights 'init --from' wrote (init.safetensors)


def select_checkpoint(mdir, which: str) -> int | str | None:
    """The checkpoint that ``which`` (``latest``, ``export``, ``init`` or a step number)
    names: a step, None for the export (model.safetensors) or ``INIT`` for the weights
    ``init --from`` wrote; CheckpointError if there is none.  ``latest`` falls back to the
    export, then (before any training of an ``init --from`` directory) to those weights."""
    if which == INIT:
        if not mdir.init_weights_path.exists():
            raise CheckpointError(f"{mdir.init_weights_path} does not exist",
                                  f"it is written by 'mlmtool init {mdir} --from MODEL_DIR'")
        return INIT
    steps = mdir.checkpoint_steps()
    if which == "export" or (which == "latest" and not steps):
        if mdir.weights_path.exists():
            return None
        if which == "latest" and mdir.init_weights_path.exists():
            return INIT
        raise CheckpointError(f"no trained model in {mdir}", f"run 'mlmtool train {mdir}' first")
    if which == "latest":
        return steps[-1]
    try:
        step = int(which)
    except ValueError:
        raise CheckpointError(f"--checkpoint {which!r} is not latest, export, init or a step number",
                              "e.g. --checkpoint latest") from None
    if step not in steps:
        stages = mdir.stages_dir
        earlier = [f"stage {n}'s {stages / str(n) / 'checkpoints'} has steps "
                   + ", ".join(map(str, checkpoint_steps(stages / str(n) / "checkpoints")))
                   for n in numbered_folders(stages)]
        raise CheckpointError(f"no checkpoint at step {step} in {mdir.checkpoints_dir} (the current stage)",
                              f"available: {', '.join(map(str, steps)) or 'none'}"
                              + (f"; eval reads the current stage only, not the earlier ones ({'; '.join(earlier)})"
                                 if earlier else ""))
    return step


def weights_step(mdir, selected: int | str | None) -> int | None:
    """The training step the weights :func:`select_checkpoint` chose are from, for the
    metrics record and TensorBoard: the step, 0 for ``init``'s, the latest checkpoint's for
    the export (written with the run's last checkpoint; None when DIR has none)."""
    if isinstance(selected, int):
        return selected
    return 0 if selected == INIT else latest_step(mdir.checkpoints_dir)


def load_params(mdir, loaded, which: str, mesh, params_sharding, config: dict | None = None) -> tuple[Any, str]:
    """Parameters of ``loaded`` (a ``mlmtool.models.LoadedModel``) from a checkpoint
    (``latest`` or a step number), the export or ``init``, laid out by ``params_sharding``;
    and their source in words."""
    step = select_checkpoint(mdir, which)
    if step == INIT:
        return jax.device_put(initial_params(mdir, loaded), params_sharding), "init (before training)"
    if step is None:
        params = loaded.load_hf(mdir.weights_path)
        return jax.device_put(params, params_sharding), "export"
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      loaded.abstract_params, params_sharding)
    with manager(mdir.checkpoints_dir, read_only=True, async_save=False) as mngr:
        out = restore(mngr, step, abstract, config=config)
    return out["params"], f"step {step}"
