"""``mlmtool init DIR``: write config.json from an offline preset, a config file and overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlmtool.cli import app
from mlmtool.cli.options import ForceOpt, JsonOpt, ModelDirArg


def _preset_help() -> str:
    from mlmtool.presets import PRESET_HELP

    return "Offline preset: " + "; ".join(f"{k} ({v})" for k, v in PRESET_HELP.items()) + "."


@app.command("init")
def init_command(
    model_dir: ModelDirArg,
    preset: Annotated[str, typer.Option("--preset", "-p", help=_preset_help())] = "roberta-base",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Override a config field: --set num_hidden_layers=6 (repeatable).",
        show_default=False)] = None,
    from_config: Annotated[Optional[Path], typer.Option(
        "--from-config", help="Start from this config.json instead of a preset.",
        show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Create DIR with a config.json (model type, sizes, special token ids)."""
    from mlmtool import presets
    from mlmtool.errors import ModelDirError
    from mlmtool.modeldir import ModelDir
    from mlmtool.progress import console, say

    config = presets.build_config(preset, overrides=set_ or [], from_config=from_config)
    mdir = ModelDir(model_dir, create=True)
    status = "written"
    if mdir.config_path.exists():
        try:
            existing = mdir.read_config()
        except Exception:
            existing = None
        if existing == config:
            status = "unchanged"
        elif not force:
            raise ModelDirError(f"{mdir.config_path} already exists with a different config",
                                "pass --force to overwrite it (or choose another DIR)")
    if status == "written":
        mdir.write_config(config)
        mdir.record("init", args={"preset": None if from_config else preset, "set": set_ or [],
                                  "from_config": str(from_config) if from_config else None})

    from mlmtool.model import ModelConfig, count_params

    n_params = count_params(ModelConfig.from_dict(config))
    info = {**presets.summary(config), "parameters": n_params, "config": str(mdir.config_path),
            "status": status}
    if json_out:
        import json

        console.print_json(json.dumps(info))
        return
    _print_summary(info, say)


def _print_summary(info: dict, say) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key in ("model_type", "layers", "hidden", "heads", "intermediate", "vocab", "max_positions"):
        table.add_row(key.replace("_", " "), str(info[key]))
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    verb = "Wrote" if info["status"] == "written" else "Up to date:"
    say(f"{verb} {info['config']}")
    say(table)
