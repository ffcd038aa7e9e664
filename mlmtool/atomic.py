"""Files and directories that appear complete or not at all: every artefact mlmtool writes.

A leaf module (standard library only), below both the model directory (:mod:`mlmtool.modeldir`)
and the weight files (:mod:`mlmtool.hf_weights`).  What is written gets the permissions of
the process's umask like any other file (not mkstemp's 0600 / mkdtemp's 0700), so a model
directory shared between users or hosts stays readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def umask() -> int:
    """The process's umask, read when a file is written (so a later ``os.umask`` counts):
    from ``/proc/self/status`` where Linux gives it, which changes nothing; else by setting
    and restoring it once (:func:`_umask_by_setting`)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:
    """``os.umask`` can only be read by setting it: for an instant it is 0 for every thread,
    so this runs once, at the first write (not at import), where /proc is not there."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same
    directory, which is flushed to disk and renamed over ``path``; then the directory is
    flushed too, so that the rename itself survives a crash (where the file system allows).

    The one way every file artefact of a model directory is written (config, JSON, weights,
    figures): a reader sees the old file or the complete new one, and the file gets the
    permissions of the umask like any other (not mkstemp's 0600), so a directory shared
    between users or hosts stays readable.  (A whole directory: :func:`atomic_directory`.)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        fd = None
        write(Path(tmp))  # a writer may replace the file (safetensors does): set the mode after it
        fd = os.open(tmp, os.O_RDONLY)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; a model directory is shared like any file
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; not possible everywhere (then skipped)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON (UTF-8, a final newline)."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``final`` whole.

    On any exception (or a kill) the temporary directory is removed (or left under a
    ``.tmp`` name that no command reads), and ``final`` is untouched.
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: other users and hosts read the block store
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(final: Path) -> None:
    """Delete what a killed :func:`atomic_directory` or :func:`atomic_write` for ``final``
    left behind (its ``.tmp`` and ``.old`` folders, its ``.tmp`` file).  Call it only while
    holding the directory's lock."""
    final = Path(final)
    for pattern in (f".{final.name}.*.tmp", f".{final.name}.old.*"):
        for p in final.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and pattern.endswith(".tmp"):
                p.unlink(missing_ok=True)
