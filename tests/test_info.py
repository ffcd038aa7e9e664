"""mlmtool info: what a model directory holds, at every stage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mlmtool.models import all_presets
from mlmtool.presets import build_config, parameter_count
from tests.pipeline import invoke, trained_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return trained_dir(tmp_path_factory)


def _info(d: Path) -> dict:
    r = invoke("info", d, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_info_on_each_stage(tmp_path, bpe_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    info = _info(empty)
    assert info["config"] is None and info["tokenizer"] is None and info["data"] is None
    assert info["next"] == f"mlmtool init {empty}"

    d = tmp_path / "m"
    assert invoke("init", d, "--preset", "tiny").exit_code == 0
    info = _info(d)
    assert info["config"]["model_type"] == "roberta" and info["config"]["layers"] == 2
    assert info["tokenizer"] is None and info["checkpoints"] is None and info["export"] is None
    assert info["next"].startswith(f"mlmtool tokenizer {d}")
    assert set(info["manifest"]) == {"init"}
    r = invoke("info", d)  # the table, on a partial directory
    assert r.exit_code == 0 and "roberta" in r.stdout and "next" in r.stdout

    info = _info(bpe_dir)  # config + tokenizer
    tok = info["tokenizer"]
    assert tok["type"] == "byte-level BPE" and tok["vocab_size"] == 400 and not tok["lowercase"]
    assert tok["special_tokens"] == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    assert info["config"]["vocab"] == 400
    assert info["next"].startswith("mlmtool prepare")


def test_info_wordpiece(wordpiece_dir):
    tok = _info(wordpiece_dir)["tokenizer"]
    assert tok["type"] == "WordPiece" and tok["lowercase"] and "[MASK]" in tok["special_tokens"]


@pytest.mark.slow
def test_info_trained(trained, monkeypatch):
    from mlmtool.runtime import progress

    monkeypatch.setattr(progress.console, "width", 240)  # the table's paths on one line, however deep tmp is
    info = _info(trained)
    data = info["data"]
    meta = json.loads((trained / "data" / "meta.json").read_text())
    assert data["blocks"] == meta["num_blocks"] and data["seq_len"] == 32 and data["tokens"] == meta["tokens"]
    assert info["checkpoints"]["steps"] == [10, 20] and info["checkpoints"]["total_steps"] == 20
    assert info["export"]["path"].endswith("model.safetensors") and info["export"]["bytes"] > 0
    assert info["metrics"]["last_train"]["step"] == 20
    assert info["metrics"]["last_eval"]["step"] == 20
    assert info["tensorboard"]["event_files"] == 1
    assert info["lock"] is None and info["init_weights"] is None
    assert set(info["manifest"]) >= {"init", "tokenizer", "prepare", "train"}
    assert info["next"] == f"mlmtool eval {trained}"
    r = invoke("info", trained)
    assert r.exit_code == 0
    for text in ("checkpoints", "10, 20", "last train", "last eval", "model.safetensors"):
        assert text in r.stdout, text


@pytest.mark.slow
def test_info_damaged_and_stale_lock(tmp_path, trained):
    d = Path(shutil.copytree(trained, tmp_path / "m"))
    (d / "data" / "meta.json").write_text("{not json")
    (d / "eval_results.json").write_text(json.dumps({"eval_loss": 1.0, "eval_accuracy": 0.5, "perplexity": 2.7,
                                                     "checkpoint": "step 20"}))
    (d / ".mlmtool.runtime.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename,
                                                 "command": "train"}))
    info = _info(d)
    assert "error" in info["data"]
    assert info["lock"]["alive"] is False
    assert info["eval_results"]["eval_loss"] == 1.0
    r = invoke("info", d)
    assert r.exit_code == 0 and "stale lock" in r.stdout and "eval results" in r.stdout
    r = invoke("info", tmp_path / "nope")
    assert r.exit_code == 1 and "does not exist" in r.stderr


@pytest.mark.parametrize("preset", sorted(all_presets()))
def test_parameter_count_matches_the_model(preset):
    """The family's arithmetic (what init and info print) == the network's parameters."""
    import math

    import jax

    from mlmtool.models import load_model

    config = build_config(preset)
    shapes = jax.tree_util.tree_leaves(load_model(config).abstract_params)
    assert parameter_count(config) == sum(math.prod(x.shape) for x in shapes)
