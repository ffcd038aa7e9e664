"""``train --dry-run`` (mlmtool.training.dryrun), ``--profile-steps`` (mlmtool.training.profiling) and the memory
arithmetic they share with the accelerator benchmark (mlmtool.runtime.devmem)."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

from mlmtool.runtime import devmem
from tests.pipeline import invoke, prepared_dir

ARGS = ("--max-steps", 60, "--per-device-train-batch-size", 8, "--eval-steps", 20, "--save-steps", 20,
        "--logging-steps", 20)


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(d.rglob("*"))}


def test_linear_estimate_and_largest_batch():
    assert devmem.linear_estimate({}, 8) is None
    assert devmem.linear_estimate({4: 400}, 8) == 800  # one point: through zero
    assert devmem.linear_estimate({4: 500, 8: 900}, 16) == 1700  # fixed 100 + 100 per row
    limit = int(10_100 / devmem.HEADROOM)  # room for 100 + 100 x 100 rows
    compiled = []

    def need_at(b):
        compiled.append(b)
        return 100 + 100 * b

    best, seen = devmem.largest_batch(need_at, 8, limit)
    assert best == 96 and seen[96] <= devmem.HEADROOM * limit  # 100 rows fit; a multiple of 8
    assert len(compiled) <= 4, compiled  # the line, then its prediction checked
    best, _ = devmem.largest_batch(lambda b: 100 + 100 * b, 256, limit)  # the first is too large: halve
    assert best == 64
    assert devmem.largest_batch(lambda b: None, 8, limit)[0] is None  # nothing compiles


def test_dry_run_options_are_checked(tmp_path):
    r = invoke("train", tmp_path / "missing", "--dry-run")
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = invoke("train", tmp_path, "--profile-steps", "-1")
    assert r.exit_code == 2


@pytest.mark.slow
def test_dry_run_changes_nothing_and_projects_the_run(tmp_path):
    """DIR is byte-identical after a dry run (no lock, checkpoint, metrics or manifest), and
    its projection is within 25% of the real run's wall time, on this CPU."""
    from mlmtool.training.dryrun import dry_run
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.train import TrainConfig, Trainer

    d = prepared_dir(tmp_path)
    before = _snapshot(d)
    r = invoke("train", d, *ARGS, "--dry-run", "--find-max-batch")
    assert r.exit_code == 0, r.output
    for what in ("tokens/s", "batch fits", "yes", "largest batch that fits", "projected wall time"):
        assert what in r.output, (what, r.output)
    assert _snapshot(d) == before

    cfg = TrainConfig(max_steps=60, per_device_train_batch_size=8, eval_steps=20, save_steps=20,
                      logging_steps=20)
    import jax

    jax.clear_caches()  # both the dry run and the real run compile cold (no program cached in this process)
    m = dry_run(Trainer(ModelDir(d), cfg), say=lambda *a: None)
    assert _snapshot(d) == before
    assert m["fits"] is True and m["tokens_per_s"] > 0 and m["evaluations"] == 3 and m["saves"] == 3
    trainer = Trainer(ModelDir(d), cfg)
    jax.clear_caches()
    t0 = time.perf_counter()
    trainer.run(say=lambda *a: None)
    wall = time.perf_counter() - t0
    assert abs(m["projected_s"] - wall) <= 0.25 * wall, (m["projected_s"], wall, m["projected_parts_s"])


@pytest.mark.slow
def test_profile_steps_traces_into_dir(tmp_path):
    d = prepared_dir(tmp_path)
    r = invoke("train", d, "--max-steps", 6, "--per-device-train-batch-size", 8, "--profile-steps", 3)
    assert r.exit_code == 0, r.output
    traces = list((d / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    assert "profile of 3 steps" in r.output and "top kernels" in r.output, r.output
    # the kernel-kind lines (which kinds appear depends on what XLA emitted: YNNPACK fusions, dots, copies)
    kinds = re.findall(r"^\s+[\d.]+ ms\s+[\d.]+%\s+(\S.*)$", r.output, flags=re.M)
    assert kinds and any("matmul" in k for k in kinds), r.output
