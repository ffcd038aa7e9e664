"""Training: CLI end to end, exact resume, loss normalisation across devices, eval determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mlmtool.training.optim import make_schedule
from mlmtool.training.train import TrainConfig, Trainer
from tests.pipeline import invoke, prepared_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_dir(tmp_path_factory.mktemp("train"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "model.safetensors", "metrics.jsonl",
                                                            "eval_results.json"))
    return dst


def _params(d: Path):
    from mlmtool.hf_weights import read_safetensors

    return read_safetensors(d / "model.safetensors")


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


TRAIN = ("--per-device-train-batch-size", 8, "--learning-rate", 1e-3, "--warmup-steps", 2,
         "--logging-steps", 2, "--save-steps", 4)


@pytest.mark.slow
def test_cli_train_eval_end_to_end(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "m")
    r = invoke("train", d, "--max-steps", 8, *TRAIN)
    assert r.exit_code == 0, r.output
    assert "tokens per step" in r.output and "parameters" in r.output
    assert (d / "model.safetensors").exists()
    steps = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    train_lines = [m for m in _metrics(d) if "loss" in m]
    assert [m["step"] for m in train_lines] == [2, 4, 6, 8]
    assert all(np.isfinite(m["loss"]) and m["tokens_per_second"] >= 0 for m in train_lines)
    assert any("eval_loss" in m for m in _metrics(d))

    r1 = invoke("eval", d, "--json")
    assert r1.exit_code == 0, r1.output
    res = json.loads(r1.output)
    assert set(res) >= {"eval_loss", "eval_accuracy", "perplexity", "eval_tokens"}
    assert res["perplexity"] == pytest.approx(np.exp(res["eval_loss"]))
    assert json.loads((d / "eval_results.json").read_text())["eval_loss"] == res["eval_loss"]
    # Determinism: a second eval and the export agree exactly; another batch size masks the
    # same tokens (per-row keys) and differs only by float summation order.
    for args in ((), ("--checkpoint", "export")):
        r = invoke("eval", d, "--json", *args)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output) | {"checkpoint": None} == res | {"checkpoint": None}
    r = invoke("eval", d, "--json", "--per-device-eval-batch-size", 3)
    other = json.loads(r.output)
    assert other["eval_tokens"] == res["eval_tokens"]
    assert other["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-6)
    # Each eval also goes to TensorBoard, at the step of the weights it scored.
    from tests.tb_events import read_scalars

    step, value = read_scalars(d / "tensorboard")["eval/loss"][-1]
    assert step == 8 and value == pytest.approx(other["eval_loss"], rel=1e-6)
    # Eval masks 15% of tokens by default and attends as the model was trained (here across
    # documents); whole-word masking and document attention on request.
    assert (res["masking"], res["mlm_probability"], res["document_attention"]) == ("token", 0.15, False)
    r = invoke("eval", d, "--json", "--masking", "whole-word", "--document-attention")
    words = json.loads(r.output)
    assert (words["masking"], words["document_attention"]) == ("whole-word", True) and words["eval_tokens"] > 0
    assert words["eval_loss"] != res["eval_loss"]
    # No 'init --from' here: --checkpoint init has nothing to read.
    r = invoke("eval", d, "--checkpoint", "init")
    assert r.exit_code == 1 and "init.safetensors does not exist" in r.output, r.output

    # A finished run resumes into "already complete" and does not train again.
    r = invoke("train", d, "--max-steps", 8, *TRAIN)
    assert r.exit_code == 0 and "already complete" in r.output, r.output

    # --no-resume refuses to clobber without --force.
    r = invoke("train", d, "--max-steps", 8, "--no-resume", *TRAIN)
    assert r.exit_code == 1 and "--force" in r.output


# Span masking at a rate going from 30% to 10%, with document attention: the masks of the
# resumed steps must be the uninterrupted run's too.
MASKING = {"masking": "span", "mlm_probability": 0.3, "mlm_probability_final": 0.1, "document_attention": True}


@pytest.mark.slow
@pytest.mark.parametrize("execution", [
    {},
    {"prng_impl": "rbg", "gradient_checkpointing": "full", "optimizer": "stable-adamw", "lr_scheduler": "inverse_sqrt"},
    {"optimizer": "lamb", "lr_scheduler": "wsd", "decay_steps": 4, **MASKING},
    {"optimizer": "lion", "learning_rate": 1e-4},
], ids=["default", "rbg+remat+stable-adamw+inverse_sqrt", "lamb+wsd+span+rate-schedule+documents", "lion"])
def test_resume_is_bit_identical(prepared, tmp_path, execution):
    cfg = TrainConfig(**{**dict(per_device_train_batch_size=8, max_steps=10, learning_rate=1e-3, warmup_steps=2,
                                logging_steps=3, save_steps=4, save_total_limit=2), **execution})
    from mlmtool.modeldir import ModelDir

    a = _copy(prepared, tmp_path / "a")
    Trainer(ModelDir(a), cfg).run(say=lambda *x: None)

    b = _copy(prepared, tmp_path / "b")
    calls = iter(range(100))
    out = Trainer(ModelDir(b), cfg).run(say=lambda *x: None, stop_requested=lambda: next(calls) == 6)
    assert out["stopped_early"] and out["final_step"] == 7
    if "masking" in execution:  # a plain 'train DIR' resumes with the recorded masking and documents
        from mlmtool.training.train_config import resume_settings

        _, taken, step = resume_settings(ModelDir(b), TrainConfig(per_device_train_batch_size=8), explicit=set())
        assert step == 7 and {k: taken[k] for k in MASKING} == MASKING
    said = []
    trainer = Trainer(ModelDir(b), cfg)
    assert str(jax.random.key_impl(trainer.rng)) == cfg.prng_impl
    assert trainer.model.module.remat == cfg.gradient_checkpointing
    out = trainer.run(say=said.append)
    assert out["start_step"] == 7 and out["final_step"] == 10
    assert any("Resuming from checkpoint step 7" in s for s in said)

    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # save_total_limit keeps the newest checkpoints only.
    assert sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == [8, 10]


def _train_subprocess(d: Path, devices: int, per_device: int, extra=()) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "mlmtool", "train", str(d), "--max-steps", "4",
           "--per-device-train-batch-size", str(per_device), "--logging-steps", "1", "--save-steps", "100",
           "--learning-rate", "1e-3", *map(str, extra)]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return [m for m in _metrics(d) if "loss" in m]


@pytest.mark.slow
def test_two_devices_match_one_device(prepared, tmp_path):
    """Loss is a token-weighted mean over the global batch, whatever the device count."""
    one = _train_subprocess(_copy(prepared, tmp_path / "one"), devices=1, per_device=8)
    two = _train_subprocess(_copy(prepared, tmp_path / "two"), devices=2, per_device=4)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["masked_tokens"] == b["masked_tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert abs(a["accuracy"] - b["accuracy"]) <= 1e-6
    pa, pb = _params(tmp_path / "one"), _params(tmp_path / "two")
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warmup_then_decay(kind):
    s = make_schedule(TrainConfig(learning_rate=1.0, lr_scheduler=kind), total_steps=110, warmup_steps=10)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    end = float(s(110))
    assert end == pytest.approx(1.0 if kind == "constant" else 0.0, abs=1e-6)
    if kind == "linear":
        assert float(s(60)) == pytest.approx(0.5)


@pytest.mark.slow
def test_gradient_accumulation_trains(prepared, tmp_path, monkeypatch):
    # Pretend the device has a known 16-bit peak of 1 GFLOP/s: the log then carries the MFU.
    monkeypatch.setattr("mlmtool.training.plan.peak_flops", lambda kind, dtype: 1e9)
    d = _copy(prepared, tmp_path / "ga")
    r = invoke("train", d, "--max-steps", 3, "--per-device-train-batch-size", 4, "--gradient-accumulation-steps", 2,
               "--logging-steps", 1, "--save-steps", 10)
    assert r.exit_code == 0, r.output
    assert "accumulation" in r.output and "MFU against 1 GFLOP/s per device" in r.output
    lines = [m for m in _metrics(d) if "loss" in m]
    assert len(lines) == 3 and all(np.isfinite(m["loss"]) for m in lines)

    from mlmtool.training.flops import training_flops_per_token
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.plan import prediction_layout

    slots, rows = prediction_layout(TrainConfig(per_device_train_batch_size=4), 32)
    per_token = training_flops_per_token(ModelDir(d).read_config(), 32, slots / (rows * 32))["executed"]
    for m in lines:
        assert m["mfu"] == pytest.approx(m["tokens_per_second"] * per_token / 1e9, rel=1e-6)


@pytest.mark.slow
def test_max_tokens_sets_the_number_of_steps(prepared, tmp_path):
    from mlmtool.training.plan import plan_training

    plan = plan_training(TrainConfig(per_device_train_batch_size=8, max_tokens=1000), n_train=850, n_val=0,
                         seq_len=32, n_devices=1)
    assert plan.total_steps == 4  # 256 tokens a step: the first step at which 1,000 were seen
    d = _copy(prepared, tmp_path / "tokens")
    r = invoke("train", d, "--max-tokens", 1000, "--per-device-train-batch-size", 8, "--logging-steps", 1,
               "--save-steps", 100)
    assert r.exit_code == 0, r.output
    last = [m for m in _metrics(d) if "loss" in m][-1]
    assert last["step"] == 4 and last["tokens_seen"] == 1024
    r = invoke("train", d, "--max-tokens", 1000, "--max-steps", 3)
    assert r.exit_code == 1 and "give --max-steps or --max-tokens, not both" in r.output


@pytest.mark.slow
def test_batch_larger_than_data_is_refused(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "big")
    r = invoke("train", d, "--per-device-train-batch-size", 100000)
    assert r.exit_code == 1
    assert "larger than" in r.output and "Traceback" not in r.output


def test_cli_defaults_are_train_config_defaults():
    """`mlmtool train`'s option defaults and TrainConfig's are one set of numbers (the library
    is called with defaults of its own from Python)."""
    import dataclasses
    import inspect

    from mlmtool.cli.train import train_command

    options = inspect.signature(train_command).parameters
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    shared = sorted(options.keys() & fields.keys())
    assert len(shared) > 25, shared
    differ = {k: (options[k].default, fields[k]) for k in shared if options[k].default != fields[k]}
    assert not differ, differ


def _timed(trainer: Trainer, seconds_per_step: float = 1.0) -> Trainer:
    """A fake clock for --max-time: each step takes ``seconds_per_step``, whatever the machine."""
    import dataclasses

    clock = {"t": 0.0}
    step = trainer.training.step

    def timed_step(*args):
        clock["t"] += seconds_per_step
        return step(*args)

    trainer.training = dataclasses.replace(trainer.training, step=timed_step)
    trainer.budget.now = lambda: clock["t"]
    return trainer


@pytest.mark.slow
def test_max_time_stops_on_budget_follows_the_clock_and_resumes(prepared, tmp_path):
    """--max-time: stops once the budget is spent (here 5.5 s of 1-s steps: after step 6), the
    learning rate follows the elapsed share of the budget, and an interrupted run continues the
    budget from its checkpoint to the same weights."""
    from mlmtool.training import checkpoint
    from mlmtool.modeldir import ModelDir

    cfg = TrainConfig(per_device_train_batch_size=8, max_steps=20, max_time=5.5, learning_rate=1e-3,
                      lr_scheduler="linear", logging_steps=1, save_steps=3)
    whole = _copy(prepared, tmp_path / "whole")
    result = _timed(Trainer(ModelDir(whole), cfg)).run(say=lambda *a: None)
    assert result["final_step"] == 6 and not result["stopped_early"]
    lrs = [m["learning_rate"] for m in _metrics(whole) if "loss" in m]
    # before step k the clock read k - 1 s: the schedule stands at (k - 1) / 5.5 of its 20 steps
    want = [1e-3 * (1 - (k - 1) / 5.5) for k in range(1, 7)]
    np.testing.assert_allclose(lrs, want, rtol=1e-5)
    assert checkpoint.restore_meta(whole / "checkpoints", 6)["elapsed_seconds"] == pytest.approx(6.0)
    assert (whole / "model.safetensors").exists()

    # interrupted at step 3, then resumed: the same steps, the same weights
    cut = _copy(prepared, tmp_path / "cut")
    stops = iter([False, False, True])
    first = _timed(Trainer(ModelDir(cut), cfg)).run(say=lambda *a: None, stop_requested=lambda: next(stops, True))
    assert first["stopped_early"] and first["final_step"] == 3
    second = _timed(Trainer(ModelDir(cut), cfg)).run(say=lambda *a: None)
    assert second["start_step"] == 3 and second["final_step"] == 6
    assert all(np.array_equal(_params(whole)[k], v) for k, v in _params(cut).items())
    # the budget spent, a plain resume has nothing left to do
    again = _timed(Trainer(ModelDir(cut), cfg)).run(say=lambda *a: None)
    assert again["final_step"] == 6


class _Rows:
    """Blocks in memory with what step.build_training reads of a BlockStore."""

    seq_len, pad_token_id, mask_token_id, special_token_ids, vocab_size = 32, 1, 4, (0, 1, 2, 3, 4), 512
    meta = {"cls_token_id": 0}
    has_starts = True  # as prepare records them

    def __init__(self, line_by_line: bool = False):
        rng = np.random.default_rng(0)
        self.rows = rng.integers(5, self.vocab_size, (64, self.seq_len)).astype(np.int32)
        self.rows[:, 0], self.rows[::3, 17] = 0, 0  # <s> starts each block, and a few documents inside
        self.line_by_line = line_by_line

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, indices):
        return self.rows[indices]


def test_build_training_sets_the_run_up_in_one_pass():
    """step.build_training: the plan whole at once (its printed lines and FLOPs included), the
    masking settings sized by it (whole-word slots from the blocks' measured spread), the
    rate schedule, document starts and the state's shapes and shardings (nothing compiled)."""
    from mlmtool.runtime import sharding as sh
    from mlmtool.training.flops import training_flops_per_token
    from mlmtool.training.plan import describe_execution, prediction_layout
    from mlmtool.presets import build_config
    from mlmtool.training.step import build_model, build_training

    config = build_config("tiny", overrides=["vocab_size=512"])
    table = np.where(np.random.default_rng(1).random(512) < 0.6, 1, 0).astype(np.uint8)
    table[:5] = 3
    cfg = TrainConfig(per_device_train_batch_size=8, max_steps=20, warmup_steps=2, masking="whole-word",
                      mlm_probability=0.2, mlm_probability_final=0.1)
    loaded = build_model(config, cfg)
    mesh = sh.make_mesh(None, devices=jax.devices()[:1])
    t = build_training(loaded, cfg, _Rows(), mesh, n_val=3, word_boundaries=table, document_attention=True)
    plan = t.plan
    assert (plan.train_blocks, plan.validation_blocks, plan.total_steps, plan.warmup_steps) == (64, 3, 20, 2)
    assert t.row_variance and (plan.prediction_slots, plan.rows_per_group) == prediction_layout(cfg, 32, t.row_variance)
    assert (t.mask_kwargs["max_predictions"], t.mask_kwargs["rows_per_group"]) == (plan.prediction_slots, 8)
    assert t.mask_kwargs["word_boundaries"] is table and t.mask_kwargs["mlm_probability"] == 0.2
    assert plan.masking.startswith(f"whole-word 20% -> 10% (linear by step), {plan.prediction_slots} prediction slots "
                                   "per 8 rows") and plan.masking.endswith("document attention on")
    assert plan.kernels == describe_execution(loaded.module) and plan.parameters == loaded.parameter_count
    share = plan.prediction_slots / (8 * 32)
    assert plan.flops_per_token == training_flops_per_token(config, 32, share)["executed"] > 0
    assert t.step_kwargs["rate_schedule"] == (0.1, 20) and t.step_kwargs["documents"] is True
    assert not t.step_kwargs["clock"] and t.objective.name == "mlm"
    assert float(t.schedule(2)) == pytest.approx(cfg.learning_rate)  # warm-up over the plan's 2 steps
    leaves = jax.tree_util.tree_leaves(t.abstract_state)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    # --line-by-line blocks hold one document each: document attention changes nothing; token
    # masking with a time budget: no measured spread, the step takes the budget's clock.
    cfg = TrainConfig(per_device_train_batch_size=8, max_steps=20, max_time=60.0)
    t = build_training(loaded, cfg, _Rows(line_by_line=True), mesh, document_attention=True)
    assert t.row_variance is None and t.step_kwargs["documents"] is False and t.step_kwargs["clock"]
    assert t.plan.masking.endswith("document attention on (one document per --line-by-line block: nothing to separate)")
    assert t.step_kwargs["rate_schedule"] is None and t.plan.max_time == 60.0
