"""Checkpoints with orbax: the one factory for the checkpoint manager, save and restore.

A checkpoint holds three items: ``params`` and ``opt_state`` (saved collectively, each
process writing its own shards) and ``meta`` (JSON: step, seed, data position, the
training arguments that fix the data order).  Evaluation restores ``params`` alone.  Orbax writes each step into
a temporary folder and renames it when complete, so a kill during a save leaves the
previous checkpoint as the latest readable one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from absl import logging as absl_logging

from mlmtool.errors import CheckpointError

absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's INFO/WARNING chatter is not for users

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


def all_steps(directory: Path) -> list[int]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    with manager(directory, read_only=True, async_save=False) as mngr:
        return sorted(mngr.all_steps())


def latest_step(directory: Path) -> int | None:
    steps = all_steps(directory)
    return steps[-1] if steps else None


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             opt_state=ocp.args.StandardSave(opt_state),
                                             meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Any = None) -> dict:
    """Restore ``step`` into arrays laid out like the abstract trees (ShapeDtypeStructs
    with shardings); without ``abstract_opt_state`` only params and meta are read.
    Raises CheckpointError with the fix if the files are damaged."""
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint step {step} in {mngr.directory} cannot be read ({e.__class__.__name__}: {str(e)[:200]})",
            f"delete {Path(str(mngr.directory)) / str(step)} to resume from an earlier one, or train with --no-resume --force") from e
    return dict(out)


def restore_meta(directory: Path, step: int) -> dict:
    with manager(directory, read_only=True, async_save=False) as mngr:
        try:
            return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} has no readable metadata ({e.__class__.__name__})",
                                  f"delete {Path(directory) / str(step)} or train with --no-resume --force") from e


def remove_all(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
