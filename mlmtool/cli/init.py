"""``mlmtool init DIR``: write config.json from an offline preset, a config file and overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlmtool.cli import app
from mlmtool.cli.options import ForceOpt, JsonOpt, ModelDirArg, emit
from mlmtool.presets import DEFAULT_PRESET


def _complete_preset(incomplete: str) -> list[str]:
    from mlmtool.models import all_presets

    return [name for name in all_presets() if name.startswith(incomplete)]


def _preset_help() -> str:
    from mlmtool.models import families

    names = ", ".join(name for family in families().values() for name in family.presets)
    return f"Offline preset: {names} (--list-presets: a table of their sizes)."


def _list_presets(value: bool) -> None:
    """``--list-presets``: the presets of every family as a table, then exit."""
    if not value:
        return
    from rich.table import Table

    from mlmtool.presets import preset_table
    from mlmtool.runtime.progress import console

    described = console.width >= 120  # the description column only where it fits beside the numbers
    table = Table(title="mlmtool init DIR --preset NAME", title_justify="left", pad_edge=False, box=None)
    columns = ["preset", "layers", "hidden", "heads", "params", "positions", "vocab"] + ([""] if described else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("preset", "") else "right", no_wrap=bool(column))
    for i, (family, rows) in enumerate(preset_table().items()):
        if i:
            table.add_row()
        table.add_row(f"[bold]{family} family[/]", *[""] * (len(columns) - 1))
        for row in rows:
            alias = f" ({', '.join(row['aliases'])})" if row["aliases"] else ""
            n = row["parameters"]
            cells = [f"  {row['preset']}{alias}", str(row["layers"]), str(row["hidden"]), str(row["heads"]),
                     f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k", str(row["positions"]), f"{row['vocab']:,}"]
            table.add_row(*cells, *([row["help"]] if described else []))
    console.print(table)
    raise typer.Exit()


@app.command("init")
def init_command(
    model_dir: ModelDirArg,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", help=_preset_help(), show_default=DEFAULT_PRESET,
        autocompletion=_complete_preset)] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="Override a config field: --set num_hidden_layers=6 (repeatable).",
        show_default=False)] = None,
    from_config: Annotated[Optional[Path], typer.Option(
        "--from-config", help="Start from this config.json instead of a preset.",
        show_default=False)] = None,
    from_model: Annotated[Optional[Path], typer.Option(
        "--from", help="Continue pre-training this Hugging Face model directory of a supported family "
                       "(config.json, tokenizer, model.safetensors): copies its config and tokenizer, "
                       "and 'train' starts from its weights.", show_default=False)] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    list_presets: Annotated[bool, typer.Option(
        "--list-presets", help="List the presets of every family (layers, hidden, heads, parameters, "
                               "positions) and exit.", callback=_list_presets, is_eager=True)] = False,
) -> None:
    """Create DIR with a config.json (model type, sizes, special token ids)."""
    from mlmtool import presets
    from mlmtool.errors import ConfigError, ModelDirError
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import say

    if from_model is not None:
        if preset is not None or from_config is not None:
            raise ConfigError("--from cannot be combined with --preset or --from-config",
                              "--from takes the config of the model directory it names")
        _init_from(model_dir, from_model, set_ or [], force, json_out)
        return
    config = presets.build_config(preset, overrides=set_ or [], from_config=from_config)
    mdir = ModelDir(model_dir, create=True)
    status, existing = "written", None
    if mdir.config_path.exists():
        try:
            existing = mdir.read_config()
        except Exception:
            existing = None
        if existing == config:
            status = "unchanged"
        elif not force:
            trained = mdir.trained_state()
            raise ModelDirError(f"{mdir.config_path} already exists with a different config"
                                + (f" ({', '.join(trained)} were made with it)" if trained else ""),
                                "pass --force to overwrite it (or choose another DIR)")
    if status == "written":

        with mdir.lock("init"):  # not under a running train, prepare or tokenizer
            mdir.write_config(config)
            if mdir.init_weights_path.exists():  # from an earlier 'init --from': not this config's
                mdir.init_weights_path.unlink()
                say(f"Removed {mdir.init_weights_path}: training starts from random weights")
            mdir.record("init", args={"preset": None if from_config else preset, "set": set_ or [],
                                      "from_config": str(from_config) if from_config else None})
        if existing is not None:  # --force over another config: say what no longer fits it (trained with it)
            from mlmtool.runtime.progress import err_console

            for what in mdir.trained_state():
                err_console.print(f"[bold yellow]warning:[/] {what} in {mdir} were made with the earlier config: "
                                  f"'mlmtool train {mdir} --no-resume --force' starts over with this one",
                                  soft_wrap=True, highlight=False)

    info = {**presets.summary(config), "parameters": presets.parameter_count(config),
            "config": str(mdir.config_path), "status": status}
    if json_out:
        emit(info)
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
    from mlmtool.models import family_for

    hint = family_for(info["model_type"]).recipe_hint(info["model_type"])
    if hint:
        say(hint)


def _init_from(model_dir, source, overrides, force, json_out) -> None:
    from mlmtool.init_from import init_from
    from mlmtool.modeldir import ModelDir
    from mlmtool.presets import parameter_count, summary
    from mlmtool.runtime.progress import err_console, say

    existed = Path(model_dir).exists()
    mdir = ModelDir(model_dir, create=True)
    try:
        with mdir.lock("init"):
            out = init_from(mdir, source, overrides=overrides, force=force)
    except BaseException:
        if not existed:  # a refused init --from leaves no empty DIR behind (only its lock file is in it)
            left = list(mdir.path.iterdir())
            if all(p == mdir.lock_path for p in left):
                mdir.lock_path.unlink(missing_ok=True)
                mdir.path.rmdir()
        raise
    config = out["config"]
    info = {**summary(config), "parameters": parameter_count(config),
            "config": str(mdir.config_path), "status": out["status"], "from": out["source"],
            "init_weights": str(mdir.init_weights_path)}
    redo = {"data": "run 'mlmtool prepare DIR FILE... --force'", "checkpoints": "train with --no-resume --force",
            "model.safetensors": "train again"}
    for name in out.get("stale", []):
        err_console.print(f"[bold yellow]warning:[/] {mdir.path / name} was made with the earlier config or "
                          f"tokenizer: {redo[name]}", soft_wrap=True, highlight=False)
    if json_out:
        emit(info)
        return
    _print_summary(info, say)
    if out["status"] == "written":
        say(f"Copied the tokenizer and the weights of {out['source']}; next: "
            f"'mlmtool prepare {mdir.path} FILE...' (no 'mlmtool tokenizer' step)")
