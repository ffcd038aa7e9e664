"""``train --checkpoint-dir PATH``: keep a run's checkpoints outside its model directory.

``DIR/checkpoints`` (``ModelDir.checkpoints_dir``) stays the one place every command looks;
with ``--checkpoint-dir PATH`` it becomes a symbolic link to ``PATH`` (a bigger disk, a
shared file system, an object-storage bucket mounted with gcsfuse or mountpoint-s3), so
``eval``, ``export``, ``info``, ``report`` and a later plain ``train DIR`` follow it without
being told.  ``PATH/.mlmtool-model-dir`` names the model directory it belongs to.

Concurrency: ``PATH`` is written only by a ``train`` holding ``DIR``'s lock (the lock file
is in ``DIR``, which needs ``flock``; ``PATH`` does not, so a bucket mount without locks is
fine), and a ``PATH`` that belongs to another model directory is refused: one run, one
writer.

URLs (``s3://``, ``gs://``, ...) are refused, not half-supported: orbax-checkpoint 0.12.8 (the
version tested) writes the arrays through TensorStore with a spec it builds for ``gs://``
alone; an ``s3://bucket/run`` path is normalised to ``s3:/bucket/run`` and given to the
``file`` driver, and the first save fails with "Checkpoint path should be absolute" after
``etils.epath`` has already written the step's metadata to the bucket (and a local folder
``s3:/bucket/...`` in the working directory).  ``gs://`` would take
orbax's GCS driver, but mlmtool's own checkpoint code (listing steps, removing unfinished
saves, ``--force``) works on local paths, and no GCS server could be run here to test it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlmtool.errors import CheckpointError, ConfigError

OWNER = ".mlmtool-model-dir"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MOUNT_HINT = ("mount the bucket (gcsfuse, mountpoint-s3, s3fs-fuse) and give the mount's path, e.g. "
               "--checkpoint-dir /mnt/bucket/run/checkpoints")


def refuse_url(where: str) -> None:
    """ConfigError for a URL: which part fails, and the way that works."""
    m = _URL.match(where)
    if not m:
        return
    scheme = m.group(1).lower()
    if scheme == "s3":
        why = ("orbax-checkpoint cannot write s3:// (its TensorStore spec treats s3://bucket/... as a local "
               "path: 'Checkpoint path should be absolute')")
    elif scheme == "gs":
        why = "gs:// is untested with mlmtool's checkpoint code, which lists and removes steps on local paths"
    else:
        why = f"{scheme}:// is not a file system orbax-checkpoint writes"
    raise ConfigError(f"--checkpoint-dir {where}: {why}", _MOUNT_HINT)


def place(checkpoints_dir: Path, where: str | None, *, create: bool) -> None:
    """Check (and with ``create``, make) ``checkpoints_dir`` -> ``where``; with ``where`` None,
    check that a link made before still leads somewhere (an unmounted bucket must not read
    as "no checkpoints": training would start over beside the real ones)."""
    link = Path(checkpoints_dir)
    model_dir = link.parent.absolute()
    if where is None:
        if link.is_symlink() and not link.is_dir():
            raise CheckpointError(f"{link} leads to {os.readlink(link)}, which does not exist or is not a "
                                  "directory (not mounted?)",
                                  "mount it again, or remove the link to start over in DIR")
        return
    refuse_url(where)
    target = Path(where).expanduser().absolute()
    if target == link.absolute():
        return  # --checkpoint-dir DIR/checkpoints: the default place
    if target == model_dir or target in model_dir.parents:  # --force would empty it, DIR included
        raise ConfigError(f"--checkpoint-dir {target} is the model directory or holds it",
                          f"give a directory of its own, e.g. {target / 'checkpoints'}")
    if link.is_symlink():
        current = Path(os.readlink(link))
        current = current if current.is_absolute() else (link.parent / current)
        if current.absolute() == target:
            _claim(target, model_dir, create, linked=True)
            return
        raise ConfigError(f"{link} already leads to {current} (this run's checkpoints), not {target}",
                          f"give --checkpoint-dir {current} or leave it out; to move them, move {current} to "
                          f"{target} and make {link} a link to it")
    if link.exists():
        steps = _steps(link)
        if steps:
            raise ConfigError(f"{link} holds checkpoints up to step {steps[-1]}: --checkpoint-dir {target} would "
                              "hide them",
                              f"move {link} to {target} (mv), then train with --checkpoint-dir {target}; or leave "
                              "--checkpoint-dir out")
        if any(link.iterdir()):
            raise ConfigError(f"{link} is not empty (no checkpoint in it, but other files)",
                              f"look at it and remove it, then train with --checkpoint-dir {target}")
    _claim(target, model_dir, create)
    if not create:
        return
    if link.exists() and not link.is_symlink():
        link.rmdir()
    try:
        os.symlink(target, link, target_is_directory=True)
    except FileExistsError:  # another process made it meanwhile: the same link, or refused
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            raise ConfigError(f"{link} was made by another process meanwhile, leading elsewhere",
                              "run one train per model directory") from None


def _claim(target: Path, model_dir: Path, create: bool, linked: bool = False) -> None:
    """``target`` for ``model_dir``: refused if it is a file, another model directory's, or holds
    checkpoints of no recorded model directory (unless ``linked``: DIR/checkpoints leads there
    already, a link made by hand); its owner record written if missing."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--checkpoint-dir {target} is a file, not a directory", "give a directory")
    owner = target / OWNER
    try:
        recorded = owner.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        recorded = None
    except OSError as e:
        raise ConfigError(f"--checkpoint-dir {target}: cannot read {owner} ({e.strerror})",
                          "check the path and its permissions") from None
    if recorded is not None and Path(recorded) != model_dir:
        raise ConfigError(f"--checkpoint-dir {target} holds the checkpoints of {recorded}, another model directory",
                          "give each run its own --checkpoint-dir")
    if recorded is None and not linked and _steps(target):
        raise ConfigError(f"--checkpoint-dir {target} already holds checkpoints (up to step {_steps(target)[-1]}) "
                          "of no recorded model directory",
                          "give an empty or new directory")
    if create and recorded is None:
        try:
            target.mkdir(parents=True, exist_ok=True)
            tmp = target / f"{OWNER}.tmp.{os.getpid()}"
            tmp.write_text(f"{model_dir}\n", encoding="utf-8")
            os.replace(tmp, owner)
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {target}: cannot write there ({e.strerror})",
                              "give a directory this process can write") from None


def _steps(directory: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in Path(directory).iterdir()
                      if p.name.isascii() and p.name.isdigit() and p.is_dir())
    except OSError:
        return []
