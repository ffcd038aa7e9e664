"""``mlmtool prepare DIR`` (being built)."""

from mlmtool.cli import app
from mlmtool.cli.options import ModelDirArg


@app.command("prepare")
def prepare_command(model_dir: ModelDirArg) -> None:
    """Not yet available."""
    from mlmtool.errors import MlmtoolError

    raise MlmtoolError("'prepare' is not available yet")
