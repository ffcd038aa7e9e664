"""``mlmtool report DIR``: training curves as a PNG and a summary table of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlmtool.cli import app
from mlmtool.cli.options import JsonOpt, ModelDirArg, emit


@app.command("report")
def report_command(
    model_dir: ModelDirArg,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where to write the figure [default: DIR/report.png].", show_default=False)] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Only the summary, no figure.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Plot the training curves (PNG) and summarize the run from DIR/metrics.jsonl.

    The figure shows loss and accuracy (train and eval), learning rate and tokens/s against
    step; the table the last and best values, steps, tokens seen and the eval results.
    """
    from mlmtool.errors import DataError
    from mlmtool.modeldir import ModelDir
    from mlmtool.runtime.progress import console, say
    from mlmtool.report import plot, summarize

    mdir = ModelDir(model_dir)
    if not no_plot:
        from mlmtool.report import check_output

        check_output(output or mdir.path / "report.png")  # before any work
    summary = summarize(mdir)
    if not summary["train_records"] and not summary["eval_records"]:
        raise DataError(f"no training metrics in {mdir.metrics_path}", f"run 'mlmtool train {mdir}' first")
    if not no_plot:
        summary["figure"] = str(plot(mdir, output or mdir.path / "report.png"))
    if json_out:
        emit(summary)
        return
    console.print(_table(summary))
    if summary.get("unreadable_lines"):
        say(f"[yellow]{summary['unreadable_lines']} unreadable line(s) in {summary['metrics']} skipped[/]")
    if "figure" in summary:
        say(f"Wrote {summary['figure']}")


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "—"
    if kind == "lr":
        return f"{value:.3e}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "rate":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.1f}"
    return str(value)


def _table(s: dict):
    from rich.table import Table

    from mlmtool.runtime.progress import human_duration

    t = Table(title=f"run summary ({s['metrics']})", title_justify="left", show_edge=False)
    t.add_column("")
    t.add_column("last", justify="right")
    t.add_column("best", justify="right")
    t.add_column("at step", justify="right")
    train = s.get("train", {})
    for key, label, kind in (("loss", "train loss", ""), ("accuracy", "train accuracy", ""),
                             ("learning_rate", "learning rate", "lr"), ("grad_norm", "grad norm", "")):
        if key in train:
            e = train[key]
            t.add_row(label, _fmt(e["last"], kind), _fmt(e.get("best"), kind),
                      _fmt(e.get("best_step"), "int") if "best_step" in e else "")
    for key, label in (("eval_loss", "eval loss"), ("eval_accuracy", "eval accuracy"), ("perplexity", "perplexity")):
        if key in s.get("eval", {}):
            e = s["eval"][key]
            t.add_row(label, f"{_fmt(e['last'])} (step {e['last_step']:,})", _fmt(e["best"]),
                      _fmt(e["best_step"], "int"))
    if "tokens_per_second" in s:
        r = s["tokens_per_second"]
        t.add_row("tokens / s", _fmt(r["last"], "rate"), _fmt(r["max"], "rate"), f"mean {_fmt(r['mean'], 'rate')}")
    t.add_section()
    if "steps" in s:
        epochs = f" ({s['epochs']:.2f} epochs)" if isinstance(s.get("epochs"), (int, float)) else ""
        stages = f" in {s['stages']} stages" if s.get("stages", 1) > 1 else ""
        t.add_row("steps", f"{s['steps']:,}{stages}{epochs}", "", "")
    if s.get("tokens_seen") is not None:
        t.add_row("tokens seen", f"{s['tokens_seen']:,}", "", "")
    if s.get("masked_tokens_seen"):
        t.add_row("predicted tokens", f"{s['masked_tokens_seen']:,}", "", "")
    if s.get("wall_seconds") is not None:
        t.add_row("wall time", human_duration(s["wall_seconds"]), "first to last record", "")
    if s.get("other_store_eval_records"):
        t.add_row("not shown", f"{s['other_store_eval_records']} evaluations of other block stores than "
                               f"{'data-' + s['data'] if s.get('data') else 'data'} (the one trained on)", "", "")
    res = s.get("eval_results")
    if isinstance(res, dict) and "eval_loss" in res:
        t.add_section()
        t.add_row(f"eval_results.json ({res.get('checkpoint', '?')})",
                  f"loss {_fmt(res['eval_loss'])}", f"accuracy {_fmt(res.get('eval_accuracy'))}",
                  f"perplexity {_fmt(res.get('perplexity'))}")
    return t
