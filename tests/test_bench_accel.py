"""The accelerator benchmark: the device check's planning (in CI, no device) and its smoke
form (on a GPU the same script measures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_accel  # noqa: E402


def _ran(plan: list[dict], fits: dict[str, int]) -> list[dict]:
    """What the first phase would report: each model's batches up to ``fits[model]`` ran."""
    out = []
    for r in plan:
        ok = r["batch_size"] <= fits[r["model"]]
        out.append({**r, **({"tokens_per_s": 1.0} if ok else {"error": "does not fit", "oom": True})})
    return out


@pytest.mark.parametrize("smoke", [False, True], ids=["device", "rehearsal"])
def test_device_check_planning(smoke):
    """scripts/device_check.sh's bench arguments (DRY_RUN=1 adds --smoke): every A/B name of the
    default list parses (one used to hold the separating comma: KeyError), both models are
    planned, and the A/B, profile and peer runs take each model's largest batch that fit."""
    script = (ROOT / "scripts" / "device_check.sh").read_text()
    assert "bench_accel.py --device-check" in script
    args = bench_accel.parse_args(["--device-check"] + (["--smoke"] if smoke else []))
    assert args.ab_names == list(bench_accel.AB) and args.profile and args.budget
    defaults, templates, compile_runs, skipped = bench_accel.plan_runs(args)
    assert not skipped
    models = {r["model"]: r for r in defaults}
    assert set(models) == {"roberta-base", "modernbert-base"}
    assert models["roberta-base"]["seq_len"] == (32 if smoke else 128)
    assert models["modernbert-base"]["seq_len"] == (64 if smoke else 1024)
    if not smoke:  # the device's sizes: no ModernBERT batch that asks for a terabyte
        assert [r["batch_size"] for r in defaults if r["model"] == "modernbert-base"] == [16, 32]
        assert models["modernbert-base"]["preset"] == "modernbert-base"
    largest = {m: max(r["batch_size"] for r in defaults if r["model"] == m) for m in models}
    fits = {"roberta-base": largest["roberta-base"], "modernbert-base": largest["modernbert-base"] // 2}
    ours = _ran(defaults, fits)
    ab_runs, notes = bench_accel.plan_ab(args, templates, ours)
    for r in ab_runs:
        assert r["batch_size"] == fits[r["model"]], r["variant"]
    profiled = [r for r in ab_runs if "profile" in r]
    assert {r["model"] for r in profiled} == set(models) and ab_runs[:2] == profiled
    variants = {(r["model"], r["variant"]) for r in ab_runs}
    assert ("roberta-base", "attention=xla") in variants and ("modernbert-base", "attention=xla") in variants
    # ModernBERT has no attention dropout: that A/B is its default, so it is not run
    assert ("modernbert-base", "no-attn-dropout") not in variants
    assert any("no-attn-dropout skipped" in n for n in notes)
    xla = next(r for r in ab_runs if r["variant"] == "attention=xla" and r["model"] == "roberta-base")
    assert xla["kernels"] == "attention=xla" and xla["config"]["attention_probs_dropout_prob"] == 0.0
    # the peer: both models, at the batches ours ran
    peer = [r for r in ours if r["variant"] == "default" and "error" not in r
            and r["batch_size"] == bench_accel.largest_fit(ours, r["model"])]
    assert {r["model"] for r in peer} == set(models)


def test_ab_names():
    assert bench_accel.parse_ab("none") == []
    assert bench_accel.parse_ab("no-attn-dropout+attention=xla,prng=rbg") == ["attention=xla", "prng=rbg"]
    with pytest.raises(SystemExit, match="unknown"):
        bench_accel.parse_ab("no-attn-dropout,attention=cudnn")


def test_token_range():
    from mlmtool.presets import build_config

    assert bench_accel.token_range(build_config("modernbert-base")) == 50280  # below [UNK]..[MASK]
    assert bench_accel.token_range(build_config("roberta-base")) == 50265


@pytest.mark.slow
def test_bench_accel_smoke(tmp_path):
    out = tmp_path / "accel.json"
    p = subprocess.run([sys.executable, "scripts/bench_accel.py", "--smoke", "--models", "roberta-base",
                        "--ab", "prng=rbg", "--no-torch-compile", "--memory-limit-gb", "1000",
                        "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    record = json.loads(out.read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == record  # the last line is the same JSON
    assert record["benchmark"] == "accel" and record["device"] and record["smoke"] is True
    assert record["not_run"] == [], record["not_run"]
    runs = {(r["variant"], r["batch_size"]): r for r in record["results"]}
    assert set(runs) == {("default", 2), ("default", 4), ("prng=rbg", 4)}, list(runs)
    for r in runs.values():
        assert {"model", "seq_len", "dtype", "batch_size", "tokens_per_s", "mfu", "mfu_model",
                "ours_over_torch"} <= set(r), r
        assert r["tokens_per_s"] > 0 and r["flops_per_token_executed"] < r["flops_per_token_model"]
        assert r["mfu"] is None  # no known peak for a CPU: MFU is quoted against the measured jnp.dot
        assert 0 < r["mfu_measured_peak"]
    [peer] = record["torch"]
    assert peer["batch_size"] == 4 and peer["tokens_per_s"] > 0 and peer["ours_over_torch"] > 0
    assert runs[("default", 4)]["ours_over_torch"] == peer["ours_over_torch"]
