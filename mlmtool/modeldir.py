"""The model directory: the one unit every subcommand reads and writes.

It is a valid Hugging Face model directory at every stage (``config.json``, then the
tokenizer files, then ``model.safetensors``), with mlmtool's own state beside it::

    DIR/
      config.json              init         (AutoConfig loads it)
      tokenizer.json           tokenizer    (AutoTokenizer loads DIR)
      tokenizer_config.json    tokenizer
      special_tokens_map.json  tokenizer
      data/                    prepare      (block store: train.bin, validation.bin, meta.json)
      checkpoints/             train        (orbax: one folder per saved step)
      init.safetensors         init --from  (starting weights for continued pre-training)
      model.safetensors        train        (export, HF key names and layouts)
      metrics.jsonl            train/eval   (one JSON object per logging event)
      tensorboard/             train        (TensorBoard event files)
      report.png               report       (training and evaluation curves)
      eval_results.json        eval         (HF key names)
      manifest.json            every step   (arguments, input fingerprints, versions)
      .mlmtool.lock            train/prepare while running (PID of the holder)

Every file is written under a temporary name and renamed into place, so an
interrupted command never leaves a half-written artefact behind.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from mlmtool.errors import ModelDirError

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DATA = "data"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"
MANIFEST = "manifest.json"
LOCK = ".mlmtool.lock"

# Packages whose versions are recorded with each artefact.
_TRACKED_PACKAGES = (
    "mlmtool", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
    "transformers", "tokenizers", "datasets", "numpy",
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same
    directory, which is flushed to disk and renamed over ``path``.

    The one way every artefact of a model directory is written (config, JSON, weights,
    figures): a reader sees the old file or the complete new one, and the file gets the
    permissions of the umask like any other (not mkstemp's 0600), so a directory shared
    between users or hosts stays readable.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        fd = None
        write(Path(tmp))  # a writer may replace the file (safetensors does): set the mode after it
        fd = os.open(tmp, os.O_RDONLY)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a model directory is shared like any file
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + rename."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``final`` whole.

    On any exception (or a kill) the temporary directory is removed (or left under a
    ``.tmp`` name that no command reads), and ``final`` is untouched.
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700: other users and hosts read the block store
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
    """Delete what a killed :func:`atomic_directory` for ``final`` left behind (its ``.tmp``
    and ``.old`` folders).  Call it only while holding the directory's lock."""
    final = Path(final)
    for pattern in (f".{final.name}.*.tmp", f".{final.name}.old.*"):
        for p in final.parent.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class ModelDir:
    """Paths and checks for one model directory."""

    def __init__(self, path: os.PathLike | str, *, create: bool = False):
        self.path = Path(path)
        self.data: str | None = None  # the block store commands read and write (None: DIR/data)
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise ModelDirError(f"{self.path} exists and is not a directory",
                                    "choose another path for the model directory")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ModelDirError(f"cannot create {self.path} ({e.strerror})",
                                    "choose a writable location") from e
        elif not self.path.exists():
            raise ModelDirError(f"model directory {self.path} does not exist",
                                f"run 'mlmtool init {self.path}' first")
        elif not self.path.is_dir():
            raise ModelDirError(f"{self.path} is not a directory",
                                "pass the model directory created by 'mlmtool init'")

    def __str__(self) -> str:
        return str(self.path)

    # -- paths ---------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    def with_data(self, name: str | None) -> "ModelDir":
        """This directory with block store ``name`` selected (``prepare --name``, ``train
        --data``): ``DIR/data-NAME``, beside the default ``DIR/data`` (None)."""
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ModelDirError(f"{name!r} is not a block store name",
                                "use letters, digits, '.', '_' and '-' (e.g. seq512)")
        other = copy.copy(self)
        other.data = name
        return other

    def data_names(self) -> list[str]:
        """The names of DIR's block stores besides the default one."""
        return sorted(p.name[len(DATA) + 1:] for p in self.path.glob(f"{DATA}-*")
                      if p.is_dir() and not p.name.endswith(".tmp"))

    @property
    def data_dir(self) -> Path:
        return self.path / (DATA if self.data is None else f"{DATA}-{self.data}")

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def stages_dir(self) -> Path:
        """The checkpoints of earlier stages, ``stages/<n>/checkpoints`` (mlmtool.stages)."""
        return self.path / "stages"

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def eval_results_path(self) -> Path:
        return self.path / EVAL_RESULTS

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (orbax renames a step's folder to its number when
        it is complete), without importing orbax."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints_dir.iterdir() if p.name.isdigit() and p.is_dir())

    def trained_state(self) -> list[str]:
        """What training left in DIR (checkpoints, the export), in words; empty if nothing."""
        steps = self.checkpoint_steps()
        out = [f"checkpoints up to step {steps[-1]}"] if steps else []
        if self.weights_path.exists():
            out.append(WEIGHTS)
        return out

    # -- stage checks --------------------------------------------------------
    def read_config(self) -> dict:
        """config.json as a full dict (every field, HF defaults filled in)."""
        if not self.config_path.exists():
            raise ModelDirError(f"no config.json in {self.path}",
                                f"run 'mlmtool init {self.path}' first")
        from mlmtool.presets import load_config_file

        return load_config_file(self.config_path)

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def require_tokenizer(self) -> Path:
        if not self.tokenizer_path.exists():
            raise ModelDirError(f"no tokenizer in {self.path}",
                                f"run 'mlmtool tokenizer {self.path} FILE...' first")
        return self.tokenizer_path

    def require_data(self) -> Path:
        if not (self.data_dir / "meta.json").exists():
            named = f" --name {self.data}" if self.data is not None else ""
            raise ModelDirError(f"no prepared data{' ' + repr(self.data) if named else ''} in {self.path}",
                                f"run 'mlmtool prepare {self.path} FILE...{named}' first")
        return self.data_dir

    # -- lock ----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, enabled: bool = True) -> Iterator[None]:
        """Hold ``DIR/.mlmtool.lock`` while ``command`` runs; refuse if another process holds it.

        The lock is an advisory ``flock`` on that file, which the kernel drops when its
        holder exits, however it exits (``kill -9`` included): a lock file left behind is
        taken over, even when its PID has been reused by another process, as in a restarted
        container.  The file records the holder's PID, host and command for the message.
        A holder on another host is assumed alive; where flock is not available, a lock
        whose PID is gone on this host is stale.
        """
        if not enabled:
            yield
            return
        fd = _acquire(self.path, command)
        try:
            yield
        finally:
            _release(self.path / LOCK, fd)

    # -- manifest ------------------------------------------------------------
    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            # The manifest is provenance only; a damaged one is rebuilt, never fatal.
            return {}

    def record(self, step: str, *, args: dict, inputs: Any = None, outputs: Any = None) -> None:
        """Record which arguments, inputs and package versions produced ``step``'s artefact."""
        manifest = self.read_manifest()
        manifest[step] = {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "args": args,
            "inputs": inputs,
            "outputs": outputs,
            "versions": package_versions(),
        }
        atomic_write_json(self.manifest_path, manifest)


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict) -> bool:
    import socket

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


def _in_use(directory: Path, holder: dict | None) -> ModelDirError:
    import socket

    if not holder:  # its holder is still writing it
        return ModelDirError(f"{directory} is in use by another mlmtool command",
                             "wait for it to finish or stop it; two commands on one directory would corrupt it")
    elsewhere = holder.get("host") != socket.gethostname()
    return ModelDirError(
        f"{directory} is in use by 'mlmtool {holder.get('command', '?')}' "
        f"(PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('time', '?')})",
        "wait for it to finish or stop it; two commands on one directory would corrupt it"
        + (f" (if it is no longer running, delete {directory / LOCK})" if elsewhere else ""))


def _cannot_write(directory: Path, e: OSError) -> ModelDirError:
    import errno

    read_only = "the file system is read-only: use a writable directory, or " if e.errno == errno.EROFS else ""
    return ModelDirError(f"cannot write to {directory} ({e.strerror})",
                         f"{read_only}check the directory's permissions and free space")


def _lock_record(command: str) -> dict:
    import socket

    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _acquire(directory: Path, command: str) -> int | None:
    """Take DIR's lock: an open, flock'ed descriptor of the lock file (None: PID scheme)."""
    import socket

    try:
        import fcntl
    except ImportError:  # not POSIX
        return _acquire_by_pid(directory, command)
    path = directory / LOCK
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise _cannot_write(directory, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(directory, _read_lock(path)) from None
        except OSError:  # no flock on this file system
            os.close(fd)
            return _acquire_by_pid(directory, command)
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
            raise _in_use(directory, holder)
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


def _acquire_by_pid(directory: Path, command: str) -> None:
    """The lock without flock: O_EXCL create; a holder whose PID is gone on this host is stale."""
    path = directory / LOCK
    me = _lock_record(command)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder and holder.get("pid") != me["pid"] and _alive(holder):
                raise _in_use(directory, holder) from None
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
