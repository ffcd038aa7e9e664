"""The model directory's lock, ``DIR/.mlmtool.runtime.lock``: one writing command at a time.

:func:`hold` holds it while a command runs and refuses, with who holds it, if another
process does.  The lock is an advisory ``flock`` on that file, which the kernel drops when
its holder exits, however it exits (``kill -9`` included): a lock file left behind is taken
over, even when its PID has been reused by another process, as in a restarted container.
The file records the holder's PID, host, command and start time for the message (and for
``mlmtool info``).  A holder on another host is assumed alive (flock may not reach across
hosts on a network file system: the file is believed); where flock is not available at all,
an ``O_EXCL`` file whose PID is gone on this host is stale.

A forked child (``prepare``'s workers) closes its copies of the lock's descriptor, so that
a child outliving its parent does not keep the directory locked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from mlmtool.errors import ModelDirError

LOCK_FILE = ".mlmtool.runtime.lock"


@contextlib.contextmanager
def hold(directory: Path, command: str, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold ``directory``'s lock while ``command`` runs (ModelDirError if it is in use).

    ``name``: the lock file in ``directory`` (another name: a finer lock, e.g. one shard's
    of ``prepare``'s block store, :mod:`mlmtool.data.shards`)."""
    fd = _acquire(Path(directory), command, name)
    try:
        yield
    finally:
        _release(Path(directory) / name, fd)


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def holder_alive(holder: dict) -> bool:
    """Whether the process a lock file names still runs (assumed so on another host)."""
    if holder.get("host") != socket.gethostname():
        return True  # another host's process: cannot check, assume alive
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


# Lock file descriptors this process holds; a forked child (prepare's workers) closes its
# copies, so that a child outliving its parent does not keep the directory locked.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _in_use(directory: Path, holder: dict | None, name: str = LOCK_FILE) -> ModelDirError:
    if not holder:  # its holder is still writing it
        return ModelDirError(f"{directory} is in use by another mlmtool command",
                             "wait for it to finish or stop it; two commands on one directory would corrupt it")
    elsewhere = holder.get("host") != socket.gethostname()
    return ModelDirError(
        f"{directory} is in use by 'mlmtool {holder.get('command', '?')}' "
        f"(PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('time', '?')})",
        "wait for it to finish or stop it; two commands on one directory would corrupt it"
        + (f" (if it is no longer running, delete {directory / name})" if elsewhere else ""))


def _cannot_write(directory: Path, e: OSError) -> ModelDirError:
    read_only = "the file system is read-only: use a writable directory, or " if e.errno == errno.EROFS else ""
    return ModelDirError(f"cannot write to {directory} ({e.strerror})",
                         f"{read_only}check the directory's permissions and free space")


def _lock_record(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _acquire(directory: Path, command: str, name: str = LOCK_FILE) -> int | None:
    """Take DIR's lock: an open, flock'ed descriptor of the lock file (None: PID scheme)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return _acquire_by_pid(directory, command, name)
    path = directory / name
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise _cannot_write(directory, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(directory, _read_lock(path), name) from None
        except OSError:  # no flock on this file system
            os.close(fd)
            return _acquire_by_pid(directory, command, name)
        try:  # the file may have been released (unlinked) between our open and flock
            st = os.stat(path)
            current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        except FileNotFoundError:
            current = False
        if not current:
            os.close(fd)
            continue
        holder = _read_lock(path)
        if holder and holder.get("host") != socket.gethostname():
            os.close(fd)  # flock may not reach across hosts: believe the file
            raise _in_use(directory, holder, name)
        _HELD.add(fd)
        try:
            data = json.dumps(_lock_record(command)).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as e:
            _release(path, fd)
            raise ModelDirError(f"cannot write to {directory} ({e.strerror})",
                                "check the directory's permissions and free space") from e
        return fd
    raise ModelDirError(f"cannot take the lock {path}", "remove it if no mlmtool command is running")


def _release(path: Path, fd: int | None) -> None:
    if fd is None:
        holder = _read_lock(path)
        if holder and holder.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return
    try:
        with contextlib.suppress(OSError):  # unlink while still holding it, then let go
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                os.unlink(path)
    finally:
        _HELD.discard(fd)
        os.close(fd)


def _acquire_by_pid(directory: Path, command: str, name: str = LOCK_FILE) -> None:
    """The lock without flock: O_EXCL create; a holder whose PID is gone on this host is stale."""
    path = directory / name
    me = _lock_record(command)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder and holder.get("pid") != me["pid"] and holder_alive(holder):
                raise _in_use(directory, holder, name) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: its process is gone
            continue
        except OSError as e:
            raise ModelDirError(f"cannot write to {directory} ({e.strerror})",
                                "check the directory's permissions and free space") from e
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    raise ModelDirError(f"cannot take the lock {path}", "remove it if no mlmtool command is running")
