"""jax's persistent compilation cache, on by default for the CLI (as MaxText does).

Compiling a large model's training step takes tens of seconds to minutes; with the cache a
resumed ``train``, an ``eval`` of the same weights or a second ``predict`` loads the compiled
program from disk instead.  Entries are keyed by the program, the devices and the library
versions, so a stale entry is never used.  jax caches only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile.

``MLMTOOL_COMPILATION_CACHE``: unset or on (``1``, ``true``, ...: the spellings of
:mod:`mlmtool.runtime.env`): ``$XDG_CACHE_HOME/mlmtool/jax`` (default ``~/.cache/mlmtool/jax``);
off (``0``, ``false``, ``no``, ``off``): no cache; anything else: that folder.  A cache folder the
user gave jax itself (``JAX_COMPILATION_CACHE_DIR``) wins.

A cache that cannot be read or written (a path under a regular file, a read-only or full
file system) never stops a command: jax then compiles without it and warns, and
:func:`configure` turns jax's raw warning (one per program, naming a cache key) into one
``warning:`` line per command that names the setting to change.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from mlmtool.runtime.env import parse_flag

ENV = "MLMTOOL_COMPILATION_CACHE"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlmtool" / "jax"


def _setting(path: Path) -> str:
    """Where :func:`cache_dir`'s answer came from, as the user would write it."""
    own = os.environ.get(ENV, "").strip()
    if parse_flag(own) is None and own and Path(own).expanduser() == path:
        return f"{ENV}={own}"
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") and path != default_dir():
        return f"JAX_COMPILATION_CACHE_DIR={path}"
    return f"{path} (the default)"


def cache_dir() -> Path | None:
    """The folder the CLI caches compiled programs in, or None when the cache is off."""
    setting = os.environ.get(ENV, "").strip()
    on = parse_flag(setting)  # the flags' spellings (mlmtool.runtime.env); anything else is a folder
    if on is False:
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return default_dir() if on or not setting else Path(setting).expanduser()


# jax's own words (jax/_src/compiler.py) when a cache entry cannot be read or written
_JAX_WARNING = re.compile(r"Error (reading|writing) persistent compilation cache entry for '[^']*': "
                          r"(?P<kind>\w+): (?P<error>.*)", re.S)
# the folder (or its lock) is unusable; any other error while reading is a damaged entry
_FOLDER_ERRORS = {"OSError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "PermissionError",
                  "FileExistsError", "TimeoutError", "Timeout", "RuntimeError"}
_state: dict = {"path": None, "setting": "", "warned": False}


def unusable(message: str) -> str | None:
    """The one line for jax's warning ``message`` about the cache, or None for any other
    warning.  jax warns "Error reading ..." when the folder cannot be made (it then compiles
    without the cache for the rest of the process) or an entry cannot be loaded (a damaged
    entry, as a write cut short by a full disk leaves: jax compiles that program again on
    every run and never replaces the entry), "Error writing ..." when a compiled program
    cannot be stored (entries already there are still read)."""
    m = _JAX_WARNING.match(message)
    if m is None:
        return None
    error = re.sub(r"^\[Errno \d+\] ", "", m["error"].strip()) or m["kind"]
    path, setting = _state["path"], _state["setting"]
    folder = path.absolute() if path is not None else "the folder"
    fix = f"set {ENV} to a writable folder, or to 0 to turn the cache off"
    if m.group(1) == "writing":
        if re.search(r"space|quota|too large", error, re.I):  # ENOSPC, EDQUOT, EFBIG: a write cut short
            fix = f"free some space and delete {folder} (a write cut short leaves a damaged entry), or {fix}"
        return f"compilation cache {setting} cannot be written ({error}): compiled programs are not kept; {fix}"
    if m["kind"] in _FOLDER_ERRORS:
        if path is not None and path.exists() and not path.is_dir():
            error = "it is a file, not a folder"
        return f"compilation cache {setting} cannot be used ({error}): compiling without it; {fix}"
    return (f"compilation cache {setting} holds a damaged entry ({m['kind']}: {error}): compiling that "
            f"program again, on every run until the entry is gone; delete {folder} (it is rebuilt), "
            f"or set {ENV} to 0")


def _show_once(previous):
    def show(message, category, filename, lineno, file=None, line=None):
        text = unusable(str(message))
        if text is None:
            return previous(message, category, filename, lineno, file, line)
        if not _state["warned"]:
            _state["warned"] = True
            from mlmtool.runtime.progress import err_console

            text = text.replace("[", r"\[")
            err_console.print(f"[bold yellow]warning:[/] {text}", markup=True, highlight=False, soft_wrap=True)

    show._mlmtool_cache = True
    return show


def configure() -> Path | None:
    """Point jax at :func:`cache_dir`, without importing jax when it is not loaded yet
    (jax reads ``JAX_COMPILATION_CACHE_DIR`` when it is imported), and make a cache that
    cannot be used one ``warning:`` line (once per call) instead of jax's warnings
    (``MLMTOOL_DEBUG=1`` keeps jax's).  A process-wide setting: the command line makes it."""
    path = cache_dir()
    _state.update(path=path, setting="" if path is None else _setting(path), warned=False)
    if path is None:
        return None
    if not getattr(warnings.showwarning, "_mlmtool_cache", False) and \
            os.environ.get("MLMTOOL_DEBUG", "") in ("", "0", "false"):
        warnings.showwarning = _show_once(warnings.showwarning)
    if "jax" in sys.modules:
        import jax

        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(path))
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    return path
