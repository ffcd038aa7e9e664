"""``mlmtool eval DIR`` (being built)."""

from mlmtool.cli import app
from mlmtool.cli.options import ModelDirArg


@app.command("eval")
def eval_command(model_dir: ModelDirArg) -> None:
    """Not yet available."""
    from mlmtool.errors import MlmtoolError

    raise MlmtoolError("'eval' is not available yet")
