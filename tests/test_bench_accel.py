"""The accelerator benchmark's smoke form (what CI runs; on a GPU the same script measures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_accel_smoke(tmp_path):
    out = tmp_path / "accel.json"
    p = subprocess.run([sys.executable, "scripts/bench_accel.py", "--smoke", "--ab", "prng=rbg",
                        "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    record = json.loads(out.read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == record  # the last line is the same JSON
    assert record["benchmark"] == "accel" and record["device"] and record["smoke"] is True
    runs = {r["variant"]: r for r in record["results"]}
    assert set(runs) == {"default", "prng=rbg"}, record["results"]
    for r in runs.values():
        assert {"model", "seq_len", "dtype", "batch_size", "tokens_per_s", "mfu"} <= set(r), r
        assert r["tokens_per_s"] > 0 and r["flops_per_token_executed"] < r["flops_per_token_model"]
        assert r["mfu"] is None  # no known peak for a CPU: MFU is quoted against the measured jnp.dot
        assert 0 < r["mfu_measured_peak"]
    [peer] = record["torch"]
    assert peer["tokens_per_s"] > 0 and peer["ours_over_torch"] > 0
    assert "modernbert-base" in record["skipped"] or "modernbert-base" in {r["model"] for r in record["results"]}
