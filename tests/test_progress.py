"""The training display's ETA counts only the steps this process ran (after a resume too)."""

from __future__ import annotations

import pytest

from mlmtool.runtime import progress
from mlmtool.runtime.progress import TrainProgress


def test_eta_after_a_resume(monkeypatch):
    clock = iter([0.0, 100.0, 110.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = TrainProgress(1000, 0, enabled=False)  # the run was created before it knew where it resumes
    p.started(900)  # resumed at step 900 (t = 100 s)
    # 50 steps in 10 s: 5 steps/s, 50 left -> 10 s (counting from step 0 would say 1 s)
    assert p.eta(950) == pytest.approx(10.0)
