"""The policies train and eval share, one function each (mlmtool.training.train_config, mlmtool.training.checkpoint):
document attention, the recorded settings, the option checks, which weights a command reads."""

from __future__ import annotations

import json

import pytest

from mlmtool.errors import CheckpointError, ConfigError, TrainingError
from mlmtool.models import family_for
from mlmtool.modeldir import ModelDir
from mlmtool.training.train_config import (TrainConfig, check_eval_options, document_attention_for,
                                          recorded_train_config, resume_changes, resume_settings)


class _NoDocuments:
    """A family whose network has no document attention (none of the registered ones today)."""
    name = "plain"
    document_attention = False
    document_attention_default = False


@pytest.mark.parametrize("requested, recorded, on", [
    (None, None, False),   # the family's default (bert: off)
    (None, True, True),    # eval: as the run trained
    (False, True, False),  # the option wins over the recorded setting
    (True, False, True),
    (True, None, True),
])
def test_document_attention_for(requested, recorded, on):
    assert document_attention_for(family_for("bert"), requested, recorded) is on


@pytest.mark.parametrize("requested, recorded", [(True, None), (None, True)])
def test_document_attention_for_a_family_without_it_is_refused(requested, recorded):
    with pytest.raises(ConfigError, match="the plain family's network does not implement document attention"):
        document_attention_for(_NoDocuments(), requested, recorded)
    assert document_attention_for(_NoDocuments(), None, None) is False


def _checkpoint(mdir: ModelDir, step: int, meta) -> None:
    folder = mdir.checkpoints_dir / str(step) / "meta"
    folder.mkdir(parents=True)
    (folder / "metadata").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def test_recorded_train_config_is_the_latest_checkpoints(tmp_path):
    mdir = ModelDir(tmp_path, create=True)
    assert recorded_train_config(mdir) == ({}, None)
    _checkpoint(mdir, 5, {"train_config": {"learning_rate": 0.1}})
    _checkpoint(mdir, 12, {"train_config": {"learning_rate": 0.2, "document_attention": True}})
    (mdir.checkpoints_dir / "13.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is no checkpoint
    assert recorded_train_config(mdir) == ({"learning_rate": 0.2, "document_attention": True}, 12)
    cfg, taken, step = resume_settings(mdir, TrainConfig(learning_rate=0.3, seed=4), explicit={"seed"})
    assert (cfg.learning_rate, cfg.seed, taken, step) == (0.2, 4, {"learning_rate": 0.2, "document_attention": True},
                                                          12)
    assert resume_changes(mdir, TrainConfig(learning_rate=0.3), explicit={"learning_rate"}) == \
        {"learning_rate": (0.2, 0.3)}


@pytest.mark.parametrize("meta, expected", [
    ("{not json", ({}, None)),                   # damaged: reported where the checkpoint is restored
    ([1, 2], ({}, None)),                        # not an object
    ({"step": 3}, ({}, 3)),                      # recorded before train_config was
    ({"train_config": "lr=0.1"}, ({}, 3)),
])
def test_recorded_train_config_of_a_damaged_or_older_checkpoint_is_empty(tmp_path, meta, expected):
    mdir = ModelDir(tmp_path, create=True)
    _checkpoint(mdir, 3, meta)
    assert recorded_train_config(mdir) == expected
    cfg = TrainConfig(learning_rate=0.3)
    assert resume_settings(mdir, cfg, explicit=set()) == (cfg, {}, expected[1])
    assert resume_changes(mdir, cfg, explicit={"learning_rate"}) == {}


@pytest.mark.parametrize("options, phrase", [
    (dict(masking="words"), "--masking must be one of token, whole-word, span, got 'words'"),
    (dict(masking="span", mlm_probability=0.85), "span masking leaves at least one word between spans"),
    (dict(mlm_probability=0.0), "--mlm-probability must be in (0, 1), got 0.0"),
    (dict(mlm_probability=float("nan")), "--mlm-probability must be in (0, 1), got nan"),
    (dict(per_device_eval_batch_size=0), "--per-device-eval-batch-size must be positive, got 0"),
    (dict(dtype="float16"), "--dtype must be float32 or bfloat16, got 'float16'"),
])
def test_eval_options_are_checked_as_train_checks_them(options, phrase):
    """eval's checks are TrainConfig's: the same message from both commands."""
    given = dict(per_device_eval_batch_size=None, mlm_probability=0.15, dtype="float32", masking="token") | options
    with pytest.raises(TrainingError) as eval_error:
        check_eval_options(**given)
    with pytest.raises(TrainingError) as train_error:
        TrainConfig(**given).validate()
    assert phrase in eval_error.value.message and eval_error.value.message == train_error.value.message


def test_eval_options_in_range_pass():
    check_eval_options(per_device_eval_batch_size=None, mlm_probability=0.4, dtype="bfloat16", masking="span")


# -- which weights eval, predict, export and eval --minimal-pairs read (mlmtool.training.checkpoint) ----------

def _weights(tmp_path, steps=(), export=False, init=False, stages=None) -> ModelDir:
    mdir = ModelDir(tmp_path / "m", create=True)
    for step in steps:
        (mdir.checkpoints_dir / str(step)).mkdir(parents=True)
    for n, old in (stages or {}).items():
        for step in old:
            (mdir.stages_dir / str(n) / "checkpoints" / str(step)).mkdir(parents=True)
    if export:
        mdir.weights_path.write_bytes(b"")
    if init:
        mdir.init_weights_path.write_bytes(b"")
    return mdir


@pytest.mark.parametrize("layout, which, selected, step", [
    (dict(steps=(2, 10), export=True), "latest", 10, 10),
    (dict(steps=(2, 10), export=True), "2", 2, 2),
    (dict(steps=(2, 10), export=True), "export", None, 10),  # the export is the run's last checkpoint's
    (dict(export=True), "latest", None, None),
    (dict(init=True), "latest", "init", 0),                  # init --from, before any training
    (dict(steps=(4,), init=True), "init", "init", 0),
])
def test_select_checkpoint(tmp_path, layout, which, selected, step):
    from mlmtool.training.checkpoint import select_checkpoint, weights_step

    mdir = _weights(tmp_path, **layout)
    assert select_checkpoint(mdir, which) == selected
    assert weights_step(mdir, selected) == step


@pytest.mark.parametrize("layout, which, phrase", [
    (dict(), "latest", "no trained model in"),
    (dict(steps=(2,)), "export", "no trained model in"),
    (dict(steps=(2,)), "init", "init.safetensors does not exist"),
    (dict(steps=(2,)), "last", "--checkpoint 'last' is not latest, export, init or a step number"),
    (dict(steps=(2, 4)), "3", "(the current stage): available: 2, 4"),
    (dict(steps=(0,), stages={1: (5, 9)}), "9", "eval reads the current stage only, not the earlier ones "
                                                "(stage 1's"),
])
def test_select_checkpoint_names_what_there_is(tmp_path, layout, which, phrase):
    from mlmtool.training.checkpoint import select_checkpoint

    mdir = _weights(tmp_path, **layout)
    with pytest.raises(CheckpointError) as e:
        select_checkpoint(mdir, which)
    assert phrase in str(e.value)
    if "stages" in layout:
        assert "has steps 5, 9" in str(e.value)
