"""``mlmtool tokenizer DIR`` (being built)."""

from mlmtool.cli import app
from mlmtool.cli.options import ModelDirArg


@app.command("tokenizer")
def tokenizer_command(model_dir: ModelDirArg) -> None:
    """Not yet available."""
    from mlmtool.errors import MlmtoolError

    raise MlmtoolError("'tokenizer' is not available yet")
