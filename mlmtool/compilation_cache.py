"""jax's persistent compilation cache, on by default for the CLI (as MaxText does).

Compiling a large model's training step takes tens of seconds to minutes; with the cache a
resumed ``train``, an ``eval`` of the same weights or a second ``predict`` loads the compiled
program from disk instead.  Entries are keyed by the program, the devices and the library
versions, so a stale entry is never used.  jax caches only programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile.

``MLMTOOL_COMPILATION_CACHE``: unset or on (``1``, ``true``, ...: the spellings of
:mod:`mlmtool.env`): ``$XDG_CACHE_HOME/mlmtool/jax`` (default ``~/.cache/mlmtool/jax``);
off (``0``, ``false``, ``no``, ``off``): no cache; anything else: that folder.  A cache folder the
user gave jax itself (``JAX_COMPILATION_CACHE_DIR``) wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlmtool.env import parse_flag

ENV = "MLMTOOL_COMPILATION_CACHE"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlmtool" / "jax"


def cache_dir() -> Path | None:
    """The folder the CLI caches compiled programs in, or None when the cache is off."""
    setting = os.environ.get(ENV, "").strip()
    on = parse_flag(setting)  # the flags' spellings (mlmtool.env); anything else is a folder
    if on is False:
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return default_dir() if on or not setting else Path(setting).expanduser()


def configure() -> Path | None:
    """Point jax at :func:`cache_dir`, without importing jax when it is not loaded yet
    (jax reads ``JAX_COMPILATION_CACHE_DIR`` when it is imported)."""
    path = cache_dir()
    if path is None:
        return None
    if "jax" in sys.modules:
        import jax

        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(path))
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    return path
