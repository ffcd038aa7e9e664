"""``mlmtool report DIR``: training curves from ``metrics.jsonl`` as a PNG, and a summary.

``metrics.jsonl`` holds one JSON object per event: training records (``step``, ``loss``,
``accuracy``, ``learning_rate``, ``grad_norm``, ``tokens_per_second``, ``tokens_seen``, ...)
and evaluation records (``eval_loss``, ``eval_accuracy``, ``perplexity``; with ``step``
from ``train``, with ``"event": "eval"`` and ``checkpoint`` from ``mlmtool eval``).

A run that was resumed from an earlier checkpoint, or restarted with ``--no-resume
--force``, writes steps again that the file already holds; as TensorBoard does, a record
whose step goes back to ``s`` drops the earlier records from step ``s`` on, so the curves
show what the model in DIR went through.

Only ``matplotlib`` (Agg backend, no display) is needed; no JAX.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mlmtool.atomic import atomic_write
from mlmtool.errors import DataError


def read_metrics(path: os.PathLike | str) -> tuple[list[dict], list[dict], int]:
    """(train records, eval records, unreadable lines) of a metrics.jsonl, restarts resolved.

    Eval records written by ``mlmtool eval`` get the step of their checkpoint (``step N``),
    or, for the export, the last training step.  Every record gets ``stage`` (0, 1, ... for
    the runs of ``train --from-checkpoint``, mlmtool.training.stages) and ``global_step``: a stage's
    steps count from 1 again while its ``tokens_seen`` goes on, so it follows the stage
    before instead of replacing it, as a resume from an earlier checkpoint does.
    """
    train: list[dict] = []
    evals: list[dict] = []
    bad = 0
    stage, offset = 0, 0  # the current stage and the global steps of the stages before it
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return [], [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1  # e.g. a line cut short by a kill
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        if "eval_loss" in rec:
            if not isinstance(rec.get("step"), int):
                ckpt = str(rec.get("checkpoint", ""))
                if ckpt.startswith("step ") and ckpt[5:].isdigit():
                    rec = {**rec, "step": int(ckpt[5:])}
                else:
                    rec = {**rec, "step": train[-1]["step"] if train else 0}
            rec.setdefault("source", "eval" if rec.get("event") == "eval" else "train")
            evals.append({**rec, "stage": stage, "global_step": offset + rec["step"]})
        elif "loss" in rec and isinstance(rec.get("step"), int):
            step = rec["step"]
            if train and step <= train[-1]["step"] and _continues(rec, train, stage):
                stage, offset = stage + 1, train[-1]["global_step"]  # a new stage
            elif train and step <= train[-1]["step"]:
                # Resumed from an earlier checkpoint, or restarted: the old records of this
                # stage from this step on no longer describe the model.
                train = [r for r in train if r["stage"] < stage or r["step"] < step]
                evals = [r for r in evals if r["stage"] < stage or r["step"] < step]
            train.append({**rec, "stage": stage, "global_step": offset + step})
    # One evaluation per step and kind: the latest.
    latest = {(r["global_step"], r["source"], r.get("data")): r for r in evals}
    evals = sorted(latest.values(), key=lambda r: r["global_step"])
    return train, evals, bad


def _continues(rec: dict, train: list[dict], stage: int) -> bool:
    """``rec`` (whose step count went back) starts a new stage instead of resuming the current
    one from an earlier checkpoint: a resume repeats the stage's token count at that step
    (tokens_seen = the stage's start + step x tokens per step); a new stage counts on from
    the checkpoint it started from -- the stage's last step, or an earlier one."""
    now, last = rec.get("tokens_seen"), train[-1].get("tokens_seen")
    if not isinstance(now, int):
        return False
    if isinstance(last, int) and now > last:
        return True
    points = sorted({(r["step"], r["tokens_seen"]) for r in train
                     if r["stage"] == stage and isinstance(r.get("tokens_seen"), int)})
    if len(points) >= 2 and points[-1][0] != points[0][0]:
        (s0, t0), (s1, t1) = points[0], points[-1]
        per_step = (t1 - t0) / (s1 - s0)
        start = t0 - s0 * per_step
    elif points and stage == 0:  # the first stage starts at 0 tokens
        (s0, t0), start = points[0], 0.0
        per_step = t0 / s0 if s0 else 0.0
    else:
        return False
    return abs(start + rec["step"] * per_step - now) > 0.5


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def trained_store(mdir) -> str | None:
    """The block store DIR's latest run trained on (``train --data``; None: DIR/data), from its
    latest checkpoint's metadata file (no orbax: report loads no jax)."""
    try:
        steps = mdir.checkpoint_steps()
        meta = json.loads((mdir.checkpoints_dir / str(steps[-1]) / "meta" / "metadata").read_text()) if steps else {}
        data = (meta.get("train_config") or {}).get("data")
    except Exception:
        return None
    return data if isinstance(data, str) else None


def same_store(evals: list[dict], store: str | None) -> tuple[list[dict], int]:
    """The evaluations of block store ``store`` (``mlmtool eval --data`` records its store;
    training's own evaluations are of the store it trained on), and how many were of others."""
    kept = [r for r in evals if r.get("source") != "eval" or r.get("data") == store]
    return kept, len(evals) - len(kept)


def summarize(mdir) -> dict[str, Any]:
    """Everything the summary table shows, as a JSON-able dict."""
    train, evals, bad = read_metrics(mdir.metrics_path)
    store = trained_store(mdir)
    evals, others = same_store(evals, store)
    out: dict[str, Any] = {"metrics": str(mdir.metrics_path), "train_records": len(train),
                           "eval_records": len(evals), "unreadable_lines": bad, "data": store,
                           "other_store_eval_records": others}
    if train:
        last = train[-1]
        out["steps"] = last["global_step"]  # of all stages
        out["stages"] = last["stage"] + 1
        out["epochs"] = last.get("epoch")
        out["tokens_seen"] = last.get("tokens_seen")
        out["masked_tokens_seen"] = sum(int(r.get("masked_tokens", 0)) for r in train)
        rates = [v for v in _finite(r.get("tokens_per_second") for r in train) if v > 0]
        out["tokens_per_second"] = {"last": last.get("tokens_per_second"),
                                    "mean": sum(rates) / len(rates) if rates else None,
                                    "max": max(rates) if rates else None}
        if len(train) >= 2 and isinstance(train[0].get("time"), (int, float)):
            out["wall_seconds"] = float(last["time"]) - float(train[0]["time"])
        out["train"] = {}
        for key, better in (("loss", min), ("accuracy", max), ("learning_rate", None), ("grad_norm", None)):
            series = [(r["global_step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
            if not series:
                continue
            entry: dict[str, Any] = {"last": series[-1][1], "first": series[0][1]}
            finite = [(s, v) for s, v in series if math.isfinite(v)]
            if better is not None and finite:
                step, value = better(finite, key=lambda sv: sv[1])
                entry.update(best=value, best_step=step)
            out["train"][key] = entry
    if evals:
        out["eval"] = {}
        for key, better in (("eval_loss", min), ("eval_accuracy", max), ("perplexity", min)):
            series = [(r["global_step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            finite = [(s, v) for s, v in series if math.isfinite(v)]
            if finite:
                step, value = better(finite, key=lambda sv: sv[1])
                out["eval"][key] = {"last": series[-1][1], "last_step": series[-1][0], "best": value,
                                    "best_step": step}
    if mdir.eval_results_path.exists():
        try:
            out["eval_results"] = json.loads(mdir.eval_results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return out


def check_output(output: os.PathLike | str) -> tuple[Path, str]:
    """The figure's path and format (from its extension), checked before any work: DataError
    for a directory or an extension matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    output = Path(output)
    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if output.is_dir():
        raise DataError(f"--output {output} is a directory", f"name a file, e.g. {output / 'report.png'}")
    fmt = output.suffix[1:].lower()
    if fmt not in supported:
        raise DataError(f"--output {output}: cannot write a figure as {output.suffix or 'a file without an extension'}",
                        f"end the name with one of {', '.join('.' + f for f in supported)} (e.g. report.png)")
    if output.parent.exists() and not output.parent.is_dir():
        raise DataError(f"--output {output}: {output.parent} is not a directory", "choose another path")
    return output, fmt


def plot(mdir, output: os.PathLike | str, *, title: str | None = None, dpi: int = 110) -> Path:
    """Write the 2 x 2 figure (loss, accuracy, learning rate, tokens/s against step) to ``output``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, evals, _ = read_metrics(mdir.metrics_path)
    evals = same_store(evals, trained_store(mdir))[0]
    if not train and not evals:
        raise DataError(f"no training metrics in {mdir.metrics_path}", f"run 'mlmtool train {mdir}' first")
    output, fmt = check_output(output)

    def series(records, key):
        pts = [(r["global_step"], r[key]) for r in records
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    starts = [r["global_step"] - r["step"] for i, r in enumerate(train) if i and r["stage"] != train[i - 1]["stage"]]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    (ax_loss, ax_acc), (ax_lr, ax_tps) = axes
    panels = [
        (ax_loss, "loss", [("loss", train, "train", "-"), ("eval_loss", evals, "eval", "o--")]),
        (ax_acc, "accuracy (masked tokens)", [("accuracy", train, "train", "-"),
                                              ("eval_accuracy", evals, "eval", "o--")]),
        (ax_lr, "learning rate", [("learning_rate", train, None, "-")]),
        (ax_tps, "tokens / s", [("tokens_per_second", train, None, "-")]),
    ]
    for ax, name, lines in panels:
        drawn = False
        for key, records, label, style in lines:
            xs, ys = series(records, key)
            if xs:
                ax.plot(xs, ys, style, label=label, markersize=4, linewidth=1.4)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        for x in starts:  # where a stage (train --from-checkpoint) began
            ax.axvline(x, color="gray", linestyle=":", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step (all stages)" if starts else "step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if any(label for _, _, label, _ in lines) and drawn:
            ax.legend()
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(title or f"mlmtool: {mdir.path.resolve().name}")
    output.parent.mkdir(parents=True, exist_ok=True)

    try:
        atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)
    return output
