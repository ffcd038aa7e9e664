"""Training in stages: a new run that starts from another run's checkpoint.

BERT trains 90% of its steps at sequence length 128 and the rest at 512 (Devlin et al.
2018); ModernBERT trains at a constant learning rate, then extends its context, then decays
(Warner et al. 2024); a warmup-stable-decay run can start its decay from any checkpoint.
Each is ``mlmtool train DIR --from-checkpoint latest`` with the next stage's settings: a NEW
run (step 0, its own schedule, optimizer, sequence length or data) whose weights, and with
``--keep-optimizer-state`` its optimizer moments, are those of the checkpoint.

The stage before is kept, not overwritten, and never hidden.  A stage starts in three
steps, so that an interruption at any point leaves one run that a plain ``mlmtool train
DIR`` continues:

1. the source is checked against DIR's model (family, config fields, parameter shapes)
   and restored in memory -- a source that does not fit is refused with nothing moved;
2. the new stage's step 0 is saved into ``DIR/stages/.next/checkpoints`` -- a kill or a
   full disk here leaves DIR's checkpoints where they were (the next ``train`` deletes the
   half-written folder and continues the run before);
3. :func:`commit`: ``DIR/checkpoints`` moves to ``DIR/stages/<n>/checkpoints`` and the
   complete step 0 takes its place -- two renames; a kill between them is finished by the
   next ``train`` (:func:`recover`), which then resumes the stage from its step 0.

Each checkpoint's metadata names where its stage started (``started_from``) and counts the
tokens of all stages (``tokens_seen``), which the metrics continue.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from mlmtool.atomic import fsync_directory
from mlmtool.errors import TrainingError
from mlmtool.modeldir import checkpoint_steps, is_number, numbered_folders

PENDING = ".next"  # DIR/stages/.next/checkpoints: a stage's step 0 while it is written


def numbers(stages_dir: Path) -> list[int]:
    """The numbered stages in ``stages_dir`` (the pending stage is not one), oldest first."""
    return numbered_folders(stages_dir)


def pending_dir(mdir) -> Path:
    return mdir.stages_dir / PENDING / "checkpoints"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a.absolute() == b.absolute()


def resolve(source: str, mdir) -> tuple[Path, int, bool]:
    """(checkpoint directory, step, whether it is DIR's own checkpoints) that ``--from-checkpoint``
    names: ``latest``, a step of DIR's own checkpoints, a step folder (``.../checkpoints/1000``),
    a checkpoints folder or a model directory (their latest step).  A path to DIR's own
    checkpoints is DIR's however it is spelled (``..``, a symlinked DIR)."""
    own = mdir.checkpoints_dir
    if source == "latest" or is_number(source):
        steps = checkpoint_steps(own)
        if not steps:
            raise TrainingError(f"--from-checkpoint {source}: {own} holds no checkpoint",
                                "train a first stage, or give the path of another run's checkpoint")
        step = steps[-1] if source == "latest" else int(source)
        if step not in steps:
            raise TrainingError(f"--from-checkpoint {source}: {own} has no step {step} (it has "
                                f"{', '.join(map(str, steps))})", "give one of those steps, or 'latest'")
        return own, step, True
    path = Path(source).expanduser()
    found = None
    if is_number(path.name) and path.is_dir():
        found = path.parent, int(path.name)
    else:
        for folder in (path / "checkpoints", path):
            steps = checkpoint_steps(folder) if folder.is_dir() else []
            if steps:
                found = folder, steps[-1]
                break
    if found is None:
        raise TrainingError(f"--from-checkpoint {source}: no checkpoint there",
                            "give 'latest', a step of DIR's checkpoints, or a path to a step folder "
                            "(.../checkpoints/STEP), a checkpoints folder or a model directory")
    folder, step = found
    if _same(folder, own):
        return own, step, True
    if step not in checkpoint_steps(folder):
        raise TrainingError(f"--from-checkpoint {source}: {folder} has no complete checkpoint {step}",
                            "give a step that was saved completely (a folder named by its step)")
    return folder, step, False


def check_source(source: str, folder: Path, step: int, meta: dict, config: dict, abstract_params: Any) -> None:
    """TrainingError naming the difference when checkpoint ``step`` in ``folder`` is not of DIR's
    model (another family, other config fields, other parameters): a stage continues the same
    network.  Called before anything moves: the message says DIR's checkpoints are untouched."""
    from mlmtool.training import checkpoint  # orbax: info reads this module's stage names without it

    what = None
    recorded = meta.get("config") if isinstance(meta, dict) else None
    if isinstance(recorded, dict):
        if recorded.get("model_type") != config.get("model_type"):
            what = (f"it is a {recorded.get('model_type')} model, DIR's config.json is a "
                    f"{config.get('model_type')} model")
        else:
            keys = dict.fromkeys((*checkpoint._architecture(recorded), *checkpoint._architecture(config)))
            diff = [k for k in keys if recorded.get(k) != config.get(k)]
            if diff:
                what = ", ".join(f"{k} {recorded.get(k)!r} -> {config.get(k)!r}" for k in diff) + \
                    " (checkpoint -> DIR's config.json)"
    if what is None:
        have, want = checkpoint.stored_shapes(folder, step), checkpoint._shapes(abstract_params)
        if have is not None and have != want:
            absent = sorted(have.keys() - want.keys()) + sorted(want.keys() - have.keys())
            if absent:
                what = f"its parameters are another network's ({absent[0]} is in one and not the other)"
            else:
                was, now = checkpoint.config_fields(have), checkpoint.config_fields(want)
                diff = sorted(k for k in was.keys() & now.keys() if was[k] != now[k])
                first = next(k for k in sorted(have) if have[k] != want[k])
                what = (", ".join(f"{k} {was[k]} -> {now[k]}" for k in diff) if diff else
                        f"{first} {have[first]} -> {want[first]}") + " (checkpoint -> DIR's config.json)"
    if what is not None:
        raise TrainingError(
            f"--from-checkpoint {source}: checkpoint step {step} in {folder} does not fit DIR's model: {what}",
            "a stage continues the same network: give a checkpoint of a run with DIR's config.json (nothing was "
            "moved: DIR's checkpoints are as they were)")


def next_archive(mdir) -> Path | None:
    """Where DIR's checkpoints go when a stage starts (``stages/<n>/checkpoints``), None if
    DIR has no complete checkpoint (nothing to keep)."""
    if not checkpoint_steps(mdir.checkpoints_dir):
        return None
    stages = mdir.stages_dir
    used = [n for n in numbers(stages) if (stages / str(n) / "checkpoints").exists()]
    return stages / str(1 + max(used, default=0)) / "checkpoints"


def _drop_pending(mdir) -> None:
    """Delete ``stages/.next`` (and ``stages/`` itself when that leaves it empty)."""
    shutil.rmtree(mdir.stages_dir / PENDING, ignore_errors=True)
    try:
        mdir.stages_dir.rmdir()
    except OSError:  # not empty (earlier stages), or absent
        pass


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    fsync_directory(dst.parent)


def commit(mdir) -> Path | None | bool:
    """Finish a stage's start whose step 0 is complete in ``stages/.next``: archive DIR's
    checkpoints, then move step 0 into their place.  Returns where the stage before went (None
    if there was none), or False when nothing was pending (a half-written step 0 is deleted:
    that stage never started)."""
    pending = pending_dir(mdir)
    if not pending.parent.exists():
        return False
    if not (pending.is_dir() and checkpoint_steps(pending)):
        _drop_pending(mdir)
        return False
    own, moved = mdir.checkpoints_dir, None
    if own.exists():
        moved = next_archive(mdir)
        if moved is not None:
            moved.parent.mkdir(parents=True, exist_ok=True)
            _rename(own, moved)
        else:  # no complete checkpoint: only the temporary folders of unfinished saves
            own.unlink() if own.is_symlink() else shutil.rmtree(own)  # a link: --checkpoint-dir's
    _rename(pending, own)
    _drop_pending(mdir)
    return moved


def recover(mdir, say: Callable[[str], Any]) -> None:
    """At the start of ``train``: finish a stage start that was interrupted between its step 0
    and its renames, or delete its half-written step 0 (the run before is then DIR's run)."""
    pending = pending_dir(mdir)
    if not pending.parent.exists():
        return
    complete = pending.is_dir() and bool(checkpoint_steps(pending))
    moved = commit(mdir)
    if complete:
        say("Finished the start of the stage that was interrupted after its step 0"
            + (f" (the stage before is kept in {moved})" if moved else ""))
    else:
        say("Deleted the half-written step 0 of a stage that was interrupted before it started "
            f"({mdir.stages_dir / PENDING}); DIR's checkpoints are as they were")


def begin(mdir, main: bool, save_step0: Callable[[Path], None], agree: Callable[..., None]) -> Path | None:
    """Start a stage atomically: ``save_step0(folder)`` writes its step 0 (every process, a
    collective) into ``stages/.next``, then :func:`commit` (process 0).  Returns where DIR's
    checkpoints went.  A failed save leaves DIR's checkpoints as they were and says so."""
    from mlmtool.training import checkpoint  # orbax (see check_source)

    pending, error = pending_dir(mdir), None
    try:
        if main:
            shutil.rmtree(pending.parent, ignore_errors=True)
            pending.parent.mkdir(parents=True)
    except Exception as e:
        error = e
    agree(error=error)
    try:
        save_step0(pending)
    except Exception as e:
        error = e
    if error is not None and main:
        _drop_pending(mdir)
    try:
        agree(error=error)
    except Exception as e:
        text = getattr(e, "message", None) or checkpoint.one_line(e)
        full = "disk is full" in text or "No space left" in text
        raise TrainingError(
            f"the new stage did not start: {'the disk is full' if full else text} (its step 0 could not be saved)",
            ("free some space, then " if full else "fix the cause, then ")
            + f"run the same 'mlmtool train {mdir.path} --from-checkpoint ...' again; nothing was moved: DIR's "
              "checkpoints are as they were, and a plain 'mlmtool train' continues the run before") from e
    moved = None
    try:
        if main:
            moved = commit(mdir)
    except Exception as e:
        error = e
    try:
        agree(error=error)
    except Exception as e:
        raise TrainingError(f"the new stage's step 0 is saved, but moving it into place failed "
                            f"({checkpoint.one_line(e)})",
                            f"fix the cause, then 'mlmtool train {mdir.path}' finishes the move and continues "
                            "the new stage") from e
    return moved if moved else None
