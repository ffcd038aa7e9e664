"""``mlmtool export DIR OUT``: a clean folder to publish (and ``--push-to-hub``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlmtool.cli import app
from mlmtool.cli.options import ForceOpt, JsonOpt, ModelDirArg, emit

HUB = "Hugging Face hub"


@app.command("export")
def export_command(
    model_dir: ModelDirArg,
    out: Annotated[Path, typer.Argument(help="The folder to write (new or empty; --force replaces it).",
                                        show_default=False)],
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", help="Export a checkpoint instead of DIR/model.safetensors: latest | STEP | init.",
        show_default="DIR/model.safetensors")] = None,
    license: Annotated[Optional[str], typer.Option(
        "--license", help="The model card's license (a hub identifier: apache-2.0, mit, cc-by-4.0, ...).",
        show_default=False)] = None,
    language: Annotated[Optional[list[str]], typer.Option(
        "--language", help="The model card's language code (repeatable: --language en --language fr).",
        show_default=False)] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", help="Then upload OUT to this hub repository (owner/name; created if needed) with "
                              "huggingface_hub and the token of HF_TOKEN or 'hf auth login'.",
        rich_help_panel=HUB, show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.",
                                          rich_help_panel=HUB)] = False,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Upload to this branch (created if needed) instead of main.", rich_help_panel=HUB,
        show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write OUT with only what a hub repository of the model holds: config.json, the
    tokenizer files, model.safetensors and a README.md model card (no checkpoints, data or logs)."""
    from mlmtool.errors import ConfigError
    from mlmtool.export import export_model, hub_client, push_to_hub as push
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import say

    if push_to_hub is None and (private or revision):
        raise ConfigError("--private and --revision go with --push-to-hub", "add --push-to-hub OWNER/NAME")
    mdir = ModelDir(model_dir)
    api = hub_client(push_to_hub) if push_to_hub else None  # before any work: the token, the id
    result = export_model(mdir, out, checkpoint=checkpoint, license=license, languages=tuple(language or ()),
                          force=force, name=push_to_hub)
    if api is not None:
        result["pushed"] = push(api, out, push_to_hub, private=private, revision=revision)
    if json_out:
        emit(result)
        return
    say(f"Wrote {result['out']} ({result['weights_from']}): {', '.join(result['files'])}")
    if "pushed" in result:
        say(f"Uploaded to {push_to_hub}: {result['pushed']}")
    else:
        say(f"Load it with AutoModelForMaskedLM.from_pretrained({str(out)!r}); publish it with "
            f"'mlmtool export {model_dir} {out} --force --push-to-hub OWNER/NAME'")
