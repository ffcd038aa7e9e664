"""``mlmtool train DIR`` (being built)."""

from mlmtool.cli import app
from mlmtool.cli.options import ModelDirArg


@app.command("train")
def train_command(model_dir: ModelDirArg) -> None:
    """Not yet available."""
    from mlmtool.errors import MlmtoolError

    raise MlmtoolError("'train' is not available yet")
