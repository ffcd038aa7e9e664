"""mlmtool report (curves PNG + summary) and the TensorBoard event files written by train."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from mlmtool.modeldir import ModelDir
from mlmtool.report import read_metrics, summarize
from mlmtool.runtime.tensorboard import TensorBoardWriter
from tests.pipeline import invoke, trained_dir
from tests.tb_events import read_events, read_scalars

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return trained_dir(tmp_path_factory)


def _records(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_report_cli_png_and_summary(trained, tmp_path):
    d = Path(shutil.copytree(trained, tmp_path / "m", ignore=shutil.ignore_patterns("checkpoints")))
    r = invoke("report", d)
    assert r.exit_code == 0, r.output
    png = d / "report.png"
    assert png.read_bytes()[:8] == PNG
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert width > 600 and height > 400
    for text in ("train loss", "eval loss", "learning rate", "tokens / s", "tokens seen", "20"):
        assert text in r.stdout, text

    out = tmp_path / "figs" / "curves.png"
    r = invoke("report", d, "--output", out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["figure"] == str(out) and out.read_bytes()[:8] == PNG
    train = [m for m in _records(d) if "loss" in m]
    assert s["steps"] == 20 and s["train_records"] == 4 and s["eval_records"] == 2
    assert s["tokens_seen"] == 20 * 8 * 32 == train[-1]["tokens_seen"]
    assert s["train"]["loss"]["last"] == train[-1]["loss"]
    assert s["train"]["loss"]["best"] == min(m["loss"] for m in train)
    assert s["eval"]["eval_loss"]["last_step"] == 20
    assert s["masked_tokens_seen"] == sum(m["masked_tokens"] for m in train)

    r = invoke("report", d, "--no-plot", "--json")
    assert "figure" not in json.loads(r.stdout)


def test_report_without_metrics(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    r = invoke("report", d)
    assert r.exit_code == 1 and "no training metrics" in r.stderr and "mlmtool train" in r.stderr
    r = invoke("report", tmp_path / "missing")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def _train(step, loss, **kw):
    return {"step": step, "epoch": step / 10, "loss": loss, "accuracy": 0.1, "learning_rate": 1e-3,
            "grad_norm": 1.0, "tokens_per_second": 100.0, "masked_tokens": 10, "time": 1000.0 + step, **kw}


def test_read_metrics_resume_restart_and_eval_command(tmp_path):
    lines = [_train(2, 5.0), _train(4, 4.0), {"step": 4, "eval_loss": 4.5, "eval_accuracy": 0.2, "perplexity": 90.0},
             _train(6, 3.0),
             # resumed from the checkpoint at step 4: step 6 again replaces the old one
             _train(6, 3.5), _train(8, 3.0),
             {"event": "eval", "checkpoint": "step 8", "eval_loss": 3.1, "eval_accuracy": 0.3, "perplexity": 22.0},
             {"event": "eval", "checkpoint": "export", "eval_loss": 3.2, "eval_accuracy": 0.3, "perplexity": 24.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + '{"step": 10, "loss"')  # cut short by a kill
    train, evals, bad = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(2, 5.0), (4, 4.0), (6, 3.5), (8, 3.0)]
    # 'mlmtool eval' of the export gets the last step; one evaluation per step is kept (the last).
    assert [(r["step"], r["eval_loss"]) for r in evals] == [(4, 4.5), (8, 3.2)]
    assert bad == 1
    # Restarted from scratch (--no-resume --force): the old run is gone.
    with path.open("a") as f:
        f.write("\n" + json.dumps(_train(2, 6.0)) + "\n")
    train, evals, _ = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(2, 6.0)] and evals == []

    s = summarize(ModelDir(tmp_path))
    assert s["steps"] == 2 and s["tokens_seen"] is None  # older records have no tokens_seen
    r = invoke("report", tmp_path, "--output", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    assert "1 unreadable line" in r.stdout


def test_read_metrics_stages_follow_each_other(tmp_path):
    """A stage (train --from-checkpoint) counts its steps from 1 again while tokens_seen goes on:
    it follows the stage before on one axis; a resume inside the stage still replaces."""
    t = lambda step, loss, tokens: _train(step, loss, tokens_seen=tokens)  # noqa: E731
    lines = [t(2, 5.0, 200), t(4, 4.0, 400), {"step": 4, "eval_loss": 4.4, "eval_accuracy": 0.2, "perplexity": 80.0},
             t(2, 3.8, 600), t(4, 3.6, 800),  # stage 2: steps 1.., tokens 400 + ...
             t(4, 3.7, 800), t(6, 3.5, 1000),  # resumed at its step 2 (its token count repeats): step 4 replaced
             {"step": 6, "eval_loss": 3.4, "eval_accuracy": 0.3, "perplexity": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    train, evals, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"], r["global_step"], r["loss"]) for r in train] == [
        (0, 2, 2, 5.0), (0, 4, 4, 4.0), (1, 2, 6, 3.8), (1, 4, 8, 3.7), (1, 6, 10, 3.5)]
    assert [(r["global_step"], r["eval_loss"]) for r in evals] == [(4, 4.4), (10, 3.4)]
    s = summarize(ModelDir(tmp_path))
    assert s["steps"] == 10 and s["stages"] == 2 and s["eval"]["eval_loss"]["best_step"] == 10
    r = invoke("report", tmp_path, "--output", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    assert "10 in 2 stages" in r.stdout and (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.slow
def test_tensorboard_events_written_by_train(trained):
    tb = trained / "tensorboard"
    files = sorted(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = list(read_events(files[0]))
    assert events[0].file_version == "brain.Event:2"
    scalars = read_scalars(tb)
    train = [m for m in _records(trained) if "loss" in m]
    evals = [m for m in _records(trained) if "eval_loss" in m]
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    for tag, key in (("train/loss", "loss"), ("train/accuracy", "accuracy"),
                     ("train/learning_rate", "learning_rate"), ("train/tokens_per_second", "tokens_per_second"),
                     ("train/tokens_seen", "tokens_seen")):
        assert [v for _, v in scalars[tag]] == pytest.approx([m[key] for m in train], rel=1e-6), tag
    assert [s for s, _ in scalars["eval/loss"]] == [10, 20]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([m["eval_loss"] for m in evals], rel=1e-6)
    assert [v for _, v in scalars["eval/perplexity"]] == pytest.approx([m["perplexity"] for m in evals], rel=1e-6)


def test_tensorboard_writer_process_zero_only_env_and_crc(tmp_path, monkeypatch):
    from mlmtool.runtime.progress import MetricsWriter

    MetricsWriter(tmp_path / "a.jsonl", enabled=False, tensorboard_dir=tmp_path / "tb0").write(_train(1, 2.0))
    assert not (tmp_path / "tb0").exists() and not (tmp_path / "a.jsonl").exists()  # not process 0
    monkeypatch.setenv("MLMTOOL_TENSORBOARD", "0")
    TensorBoardWriter(tmp_path / "tb1").write(_train(1, 2.0))
    assert not (tmp_path / "tb1").exists()
    monkeypatch.delenv("MLMTOOL_TENSORBOARD")
    w = TensorBoardWriter(tmp_path / "tb2")
    w.write(_train(1, 2.0))
    w.write({"event": "eval", "note": "no step: skipped"})
    w.write(_train(2, 1.5))
    assert read_scalars(tmp_path / "tb2")["train/loss"] == [(1, 2.0), (2, 1.5)]
    data = bytearray(w.path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of the last record's data
    w.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        list(read_events(w.path))
