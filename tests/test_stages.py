"""Training in stages (mlmtool.training.stages): a new run from another run's checkpoint continues its
weights (and, if asked, its optimizer state), keeps the stage before, and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mlmtool.training import checkpoint
from mlmtool.modeldir import ModelDir, checkpoint_steps
from mlmtool.training.train import TrainConfig, Trainer
from tests.pipeline import invoke, prepared_dir

pytestmark = pytest.mark.slow  # Trainer runs over a trained first stage

BASE = dict(per_device_train_batch_size=8, warmup_steps=0, logging_steps=1)
STAGE1 = TrainConfig(**BASE, max_steps=6, learning_rate=3e-3, save_steps=3)
STAGE2 = TrainConfig(**BASE, max_steps=4, learning_rate=1e-3, lr_scheduler="constant", save_steps=2)


@pytest.fixture(scope="module")
def after_stage1(tmp_path_factory) -> Path:
    d = prepared_dir(tmp_path_factory.mktemp("stages"))
    Trainer(ModelDir(d), STAGE1).run(say=lambda *a: None)
    return d


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _losses(d: Path) -> list[dict]:
    return [m for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _restore(folder: Path, step: int, trainer: Trainer, opt_state: bool = False) -> dict:
    with checkpoint.manager(folder, read_only=True, async_save=False) as mngr:
        return checkpoint.restore(mngr, step, trainer.training.abstract_state.params,
                                  trainer.training.abstract_state.opt_state if opt_state else None)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_a_second_stage_continues_the_first(after_stage1, tmp_path):
    d = _copy(after_stage1, tmp_path / "two")
    said = []
    trainer = Trainer(ModelDir(d), STAGE2)
    out = trainer.run(say=said.append, from_checkpoint="latest")
    assert out["start_step"] == 0 and out["final_step"] == 4
    assert any("New stage from step 6 of the run before" in s and "stages/1/checkpoints" in s for s in said), said
    # The stage before is kept; the new one starts with its weights, saved at step 0.
    assert checkpoint_steps(d / "stages" / "1" / "checkpoints") == [3, 6]
    assert checkpoint_steps(d / "checkpoints") == [0, 2, 4]
    first = _restore(d / "stages" / "1" / "checkpoints", 6, trainer, opt_state=True)
    start = _restore(d / "checkpoints", 0, trainer, opt_state=True)
    assert _equal(start["params"], first["params"])
    assert not _equal(start["opt_state"], first["opt_state"])  # a fresh optimizer state unless kept
    assert start["meta"]["started_from"]["step"] == 6 and start["meta"]["tokens_seen"] == 6 * 256
    # Its first step scores the first stage's weights: on the same batch with the same masks
    # (step 0 of each run) a fresh model's loss is far higher.
    losses1, losses2 = _losses(d)[:6], _losses(d)[6:]
    fresh, continued = losses1[0]["loss"], losses2[0]["loss"]
    assert continued < fresh - 0.2, (fresh, continued, losses1[-1]["loss"])
    assert abs(continued - losses1[-1]["loss"]) < abs(continued - fresh)
    # The token count goes on across stages.
    assert [m["tokens_seen"] for m in losses2] == [(6 + i) * 256 for i in range(1, 5)]
    # info shows both stages and where the second started.
    r = invoke("info", d)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())
    assert "stage 1 steps 3, 6 (latest 6 of 6)" in text and "1,536 tokens seen" in text, text
    assert "stage 2 steps 0, 2, 4 (latest 4 of 4)" in text and "started from step 6 of" in text, text
    r = invoke("info", d, "--json")
    info = json.loads(r.output)
    assert [s["latest"] for s in info["stages"]] == [6] and info["checkpoints"]["started_from"]["step"] == 6


def test_optimizer_state_kept_and_an_interrupted_stage_resumes_exactly(after_stage1, tmp_path):
    a = _copy(after_stage1, tmp_path / "a")
    Trainer(ModelDir(a), STAGE2).run(say=lambda *x: None, from_checkpoint="6", keep_optimizer_state=True)
    b = _copy(after_stage1, tmp_path / "b")
    calls = iter(range(100))
    out = Trainer(ModelDir(b), STAGE2).run(say=lambda *x: None, from_checkpoint="6", keep_optimizer_state=True,
                                           stop_requested=lambda: next(calls) == 0)
    assert out["stopped_early"] and out["final_step"] == 1
    said = []
    trainer = Trainer(ModelDir(b), STAGE2)
    out = trainer.run(say=said.append)  # a plain resume continues the stage
    assert out["start_step"] == 1 and any("Resuming from checkpoint step 1" in s for s in said)
    start = _restore(a / "checkpoints", 0, trainer, opt_state=True)
    first = _restore(a / "stages" / "1" / "checkpoints", 6, trainer, opt_state=True)
    assert _equal(start["opt_state"], first["opt_state"])  # kept
    assert _equal(_restore(a / "checkpoints", 4, trainer)["params"], _restore(b / "checkpoints", 4, trainer)["params"])
    assert _losses(b)[-1]["tokens_seen"] == 10 * 256


def test_from_checkpoint_mistakes_are_one_line(after_stage1, tmp_path):
    d = _copy(after_stage1, tmp_path / "m")
    r = invoke("train", d, "--max-steps", 2, "--from-checkpoint", "7")
    assert r.exit_code == 1 and "has no step 7 (it has 3, 6)" in r.output, r.output
    r = invoke("train", d, "--max-steps", 2, "--from-checkpoint", tmp_path / "nowhere")
    assert r.exit_code == 1 and "no checkpoint there" in r.output, r.output
    r = invoke("train", d, "--max-steps", 2, "--keep-optimizer-state")
    assert r.exit_code == 1 and "goes with --from-checkpoint" in r.output, r.output
    r = invoke("train", d, "--max-steps", 2, "--from-checkpoint", "latest", "--keep-optimizer-state",
               "--optimizer", "lion")
    assert r.exit_code == 1 and "holds the state of --optimizer adamw" in r.output, r.output
    assert checkpoint_steps(d / "checkpoints") == [3, 6] and not (d / "stages").exists()  # untouched


def test_block_stores_side_by_side(after_stage1, tmp_path):
    """prepare --name keeps a second store beside DIR/data; train and eval --data read it, and a
    plain resume of that run reads it again (it is a recorded setting)."""
    d = _copy(after_stage1, tmp_path / "named")
    corpus = after_stage1.parent / "corpus.txt"
    r = invoke("prepare", d, corpus, "--max-seq-length", 64, "--name", "seq64")
    assert r.exit_code == 0, r.output
    assert (d / "data-seq64" / "meta.json").exists()
    assert json.loads((d / "data" / "meta.json").read_text())["seq_len"] == 32
    r = invoke("train", d, "--from-checkpoint", "latest", "--data", "seq64", "--max-steps", 3,
               "--per-device-train-batch-size", 4, "--save-steps", 1, "--logging-steps", 1)
    assert r.exit_code == 0, r.output
    start = checkpoint.restore_meta(d / "checkpoints", 3)
    assert start["run"]["seq_len"] == 64 and start["train_config"]["data"] == "seq64"
    shutil.rmtree(d / "checkpoints" / "3")
    (d / "model.safetensors").unlink()
    r = invoke("train", d)  # a plain resume: the recorded settings, the seq64 store included
    assert r.exit_code == 0 and "Resuming from checkpoint step 2" in r.output, r.output
    r = invoke("eval", d, "--data", "seq64", "--json")
    assert r.exit_code == 0, r.output
    r = invoke("info", d)
    assert "data seq64" in r.output and "seq len 64" in r.output, r.output
    r = invoke("train", d, "--data", "nope", "--max-steps", 1)
    assert r.exit_code == 1 and "no prepared data 'nope'" in r.output and "--name nope" in r.output, r.output
    r = invoke("prepare", d, corpus, "--name", "../x")
    assert r.exit_code == 1 and "is not a block store name" in r.output, r.output
