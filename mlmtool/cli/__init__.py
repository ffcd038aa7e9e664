"""The ``mlmtool`` command line.

Each subcommand lives in its own module and stays thin: parse options, call the
library, print.  Library errors (:class:`mlmtool.errors.MlmtoolError`) become one line
on stderr and exit code 1 here, in one place (``MLMTOOL_DEBUG=1`` shows the traceback).
Nothing on the ``--help`` path imports jax or transformers.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperGroup

from mlmtool.runtime import env
from mlmtool.errors import MlmtoolError


def debug() -> bool:
    return env.flag(env.DEBUG, strict=False)  # an unreadable value is refused by the root callback


def quiet_orbax() -> None:
    """Keep orbax's logging and one harmless asyncio complaint off the user's terminal.

    orbax's INFO/WARNING chatter is not for users, nor are the tracebacks it logs when a
    save fails (disk full): ``checkpoint.save`` and ``wait`` raise that failure as one
    CheckpointError line.  And after a failed asynchronous save, tensorstore calls back into
    orbax's closed event loop, which Python reports as an unraisable "Event loop is closed".
    ``MLMTOOL_DEBUG=1`` keeps orbax's errors and every unraisable exception.

    A process-wide setting, so the command line makes it (once, in its root callback), not
    ``mlmtool.training.checkpoint`` on import: a notebook importing the library keeps its own logging.
    Costs the import of ``absl.logging`` (about 20 ms), not of orbax or jax; without absl
    (it comes with orbax) there is no orbax logging to quiet.
    """
    try:
        from absl import logging as absl_logging
    except ImportError:
        pass
    else:
        absl_logging.set_verbosity(absl_logging.ERROR if debug() else absl_logging.FATAL)
    if debug() or getattr(sys.unraisablehook, "_mlmtool_quiet", False):
        return
    previous = sys.unraisablehook

    def quiet_closed_loop(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    quiet_closed_loop._mlmtool_quiet = True
    sys.unraisablehook = quiet_closed_loop


def _error_line(message: str) -> None:
    from mlmtool.runtime.progress import err_console

    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def _os_error(e: OSError) -> str:
    """'problem (file): fix' for an OSError from the environment."""
    import errno

    what = e.strerror or (os.strerror(e.errno) if isinstance(e.errno, int) else str(e) or e.__class__.__name__)
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    hint = {errno.ENOSPC: "free some space and run the command again (finished artefacts are intact)",
            errno.EDQUOT: "free some space and run the command again (finished artefacts are intact)",
            errno.EROFS: "the file system is read-only: use a writable directory",
            errno.EACCES: "check the permissions of the model directory and the input files",
            errno.EPERM: "check the permissions of the model directory and the input files",
            errno.ENOMEM: "free memory, or use smaller batches (--per-device-train-batch-size, --num-proc)",
            }.get(e.errno, "check the file system and run the command again")
    return f"{what}{where}: {hint}"


class _Group(TyperGroup):
    """Turns the project's errors into one line + exit 1 for every subcommand."""

    def list_commands(self, ctx):  # keep the pipeline order, not alphabetical
        return list(self.commands)

    def invoke(self, ctx: click.Context):
        from mlmtool.runtime.interrupt import Terminated, terminate_cleanly

        try:
            with terminate_cleanly():
                return super().invoke(ctx)
        except Terminated:  # cleaned up on the way out: temporary files removed, lock released
            if debug():
                raise
            _error_line("stopped by SIGTERM; temporary files removed, finished artefacts kept as they were: "
                        "run the command again")
            raise typer.Exit(143) from None
        except MlmtoolError as e:
            if debug():
                raise
            _error_line(str(e).replace("[", r"\["))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # a second Ctrl-C during train, or Ctrl-C elsewhere
            if debug():
                raise
            _error_line("interrupted")
            raise typer.Exit(130) from None
        except OSError as e:
            # Disk full, permission denied, ...: the user's environment, not our bug.
            if debug():
                raise
            _error_line(_os_error(e).replace("[", r"\["))
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="mlmtool",
    help="Pre-train masked-language encoders (RoBERTa, BERT, XLM-R, DistilBERT, ...) in JAX/Flax, from raw text to a "
         "Hugging Face model directory.\n\nPipeline: init → tokenizer → prepare → train → eval; "
         "then predict, report, info.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from mlmtool import __version__

        typer.echo(f"mlmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q",  # MLMTOOL_QUIET is read by mlmtool.runtime.env, as every flag
                               help="Print only errors and requested results (MLMTOOL_QUIET=1 does the same)."),
) -> None:
    from mlmtool.runtime import compilation_cache
    from mlmtool.runtime.progress import set_quiet

    env.check_flags()  # MLMTOOL_DEBUG=maybe: one error line, not a guess
    set_quiet(quiet)
    compilation_cache.configure()
    quiet_orbax()
    # transformers advises installing PyTorch when it is absent; mlmtool never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _register() -> None:
    # Each module registers its command on import; this order is the --help order.
    from mlmtool.cli import init, tokenizer, prepare, train  # noqa: F401
    from mlmtool.cli import eval as eval_cmd  # noqa: F401
    from mlmtool.cli import predict  # noqa: F401
    from mlmtool.cli import report, info  # noqa: F401
    from mlmtool.cli import export  # noqa: F401


_register()


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)
