"""``mlmtool predict DIR TEXT...``: fill-mask predictions from the trained model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlmtool import constants
from mlmtool.cli import app
from mlmtool.cli.options import CheckpointOpt, JsonOpt, ModelDirArg, emit


@app.command("predict")
def predict_command(
    model_dir: ModelDirArg,
    texts: Annotated[Optional[list[str]], typer.Argument(
        help="Texts with the mask token (<mask> or [MASK]); none or '-' reads one text per line from stdin.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Predictions per mask.")] = 5,
    checkpoint: CheckpointOpt = constants.LATEST,
    json_out: JsonOpt = False,
) -> None:
    """Fill in the masked tokens of TEXT, like transformers' fill-mask pipeline."""
    import sys

    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import console

    mdir = ModelDir(model_dir)
    if not texts or texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        from mlmtool.errors import DataError

        raise DataError("no text given", "pass a text with a mask token, e.g. \"The capital of France is <mask>.\"")
    from mlmtool.predict import fill_mask

    results = fill_mask(mdir, texts, top_k=top_k, checkpoint=checkpoint)
    if json_out:
        emit(results if len(texts) > 1 else results[0])
        return
    from rich.table import Table

    for text, res in zip(texts, results):
        groups = [res] if res and isinstance(res[0], dict) else res
        for i, preds in enumerate(groups):
            title = text if len(groups) == 1 else f"{text}  (mask {i + 1})"
            table = Table(title=title, title_justify="left", show_edge=False)
            table.add_column("score", justify="right")
            table.add_column("token")
            table.add_column("sequence")
            for p in preds:
                table.add_row(f"{p['score']:.4f}", repr(p["token_str"]), p["sequence"])
            console.print(table)
