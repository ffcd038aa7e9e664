"""Training in stages: a new run that starts from another run's checkpoint.

BERT trains 90% of its steps at sequence length 128 and the rest at 512 (Devlin et al.
2018); ModernBERT trains at a constant learning rate, then extends its context, then decays
(Warner et al. 2024); a warmup-stable-decay run can start its decay from any checkpoint.
Each is ``mlmtool train DIR --from-checkpoint latest`` with the next stage's settings: a NEW
run (step 0, its own schedule, optimizer, sequence length or data) whose weights, and with
``--keep-optimizer-state`` its optimizer moments, are those of the checkpoint.

The stage before is kept, not overwritten: ``DIR/checkpoints`` moves to
``DIR/stages/<n>/checkpoints`` and the new run writes ``DIR/checkpoints`` from step 0 (saved
at once, so a stage interrupted before its first checkpoint resumes where it started).  Each
checkpoint's metadata names where its stage started (``started_from``) and counts the tokens
of all stages (``tokens_seen``), which the metrics continue.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlmtool import checkpoint
from mlmtool.errors import TrainingError


def resolve(source: str, mdir) -> tuple[Path, int]:
    """(checkpoint directory, step) that ``--from-checkpoint`` names: ``latest``, a step of
    DIR's own checkpoints, a step folder (``.../checkpoints/1000``), a checkpoints folder or a
    model directory (their latest step)."""
    own = mdir.checkpoints_dir
    if source == "latest" or source.isdigit():
        steps = checkpoint.all_steps(own)
        if not steps:
            raise TrainingError(f"--from-checkpoint {source}: {own} holds no checkpoint",
                                "train a first stage, or give the path of another run's checkpoint")
        step = steps[-1] if source == "latest" else int(source)
        if step not in steps:
            raise TrainingError(f"--from-checkpoint {source}: {own} has no step {step} (it has "
                                f"{', '.join(map(str, steps))})", "give one of those steps, or 'latest'")
        return own, step
    path = Path(source).expanduser()
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    for folder in (path / "checkpoints", path):
        steps = checkpoint.all_steps(folder) if folder.is_dir() else []
        if steps:
            return folder, steps[-1]
    raise TrainingError(f"--from-checkpoint {source}: no checkpoint there",
                        "give 'latest', a step of DIR's checkpoints, or a path to a step folder "
                        "(.../checkpoints/STEP), a checkpoints folder or a model directory")


def archive(mdir, main: bool) -> Path | None:
    """Move DIR's checkpoints (the stage before) to ``DIR/stages/<n>/checkpoints``; returns
    where they went (None when there were none).  On process 0 only: the folder is shared."""
    if not checkpoint.all_steps(mdir.checkpoints_dir):
        return None
    stages = mdir.stages_dir
    n = 1 + max((int(p.name) for p in stages.iterdir() if p.name.isdigit()), default=0) if stages.is_dir() else 1
    target = stages / str(n) / "checkpoints"
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(mdir.checkpoints_dir), str(target))
    return target
