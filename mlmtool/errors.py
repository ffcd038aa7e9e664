"""The project's error types.

Library code raises these; the CLI (``mlmtool.cli.main``) turns any of them into a
one-line message on stderr and exit code 1.  A traceback is shown only when the
environment variable ``MLMTOOL_DEBUG`` is set.
"""

from __future__ import annotations


class MlmtoolError(Exception):
    """A user-facing error: the message names the problem, ``hint`` names the fix."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class ConfigError(MlmtoolError):
    """Bad model configuration, preset or override."""


class ModelDirError(MlmtoolError):
    """The model directory is missing, incomplete, locked or damaged."""


class DataError(MlmtoolError):
    """Bad or missing corpus / prepared data."""


class CheckpointError(MlmtoolError):
    """A checkpoint is missing or unreadable."""


class TrainingError(MlmtoolError):
    """Training cannot start or must stop (bad batch size, NaN loss, ...)."""
