"""The ``MLMTOOL_*`` on/off environment variables, read one way.

``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off`` (any case; unset or empty:
the flag's default) for every flag; any other value is refused in one line naming the
variable, never read as on or off.  ``MLMTOOL_COMPILATION_CACHE`` takes the same spellings
or a folder (:func:`parse_flag` tells them apart).  Imports nothing heavy: the command line
checks the flags (:func:`check_flags`) before any work.
"""

from __future__ import annotations

import os

from mlmtool.errors import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

DEBUG = "MLMTOOL_DEBUG"              # tracebacks instead of one error line; orbax's logging
QUIET = "MLMTOOL_QUIET"              # print only errors and requested results (--quiet)
TENSORBOARD = "MLMTOOL_TENSORBOARD"  # train writes DIR/tensorboard/ event files
FLAGS = {DEBUG: False, QUIET: False, TENSORBOARD: True}  # each flag's default


def parse_flag(text: str | None) -> bool | None:
    """True or False for a flag spelling, None for anything else (unset and empty included)."""
    value = (text or "").strip().lower()
    return True if value in TRUE else False if value in FALSE else None


def flag(name: str, *, strict: bool = True) -> bool:
    """The flag ``name`` (one of :data:`FLAGS`): its default when unset or empty; a value that
    is neither on nor off is a ConfigError naming the variable (``strict=False``: the default,
    for the error handler itself, after :func:`check_flags` has refused it)."""
    default = FLAGS[name]
    text = os.environ.get(name, "")
    if not text.strip():
        return default
    value = parse_flag(text)
    if value is None:
        if not strict:
            return default
        raise ConfigError(f"{name}={text!r} is neither on nor off",
                          f"set it to one of {', '.join(TRUE)} (on) or {', '.join(FALSE)} (off), or unset it")
    return value


def check_flags() -> None:
    """Refuse an unreadable value of any flag, before the command does anything."""
    for name in FLAGS:
        flag(name)
