"""The CLI's persistent compilation cache: where it goes, how it is turned off, and that a
resumed ``train`` and an ``eval`` load the compiled programs instead of compiling again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlmtool import compilation_cache
from tests.pipeline import prepared_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting,expected", [
    ("", "xdg/mlmtool/jax"), ("1", "xdg/mlmtool/jax"), ("on", "xdg/mlmtool/jax"),
    ("0", None), ("off", None), ("OFF", None), ("false", None),
    ("{tmp}/mine", "mine"),
])
def test_cache_dir_from_the_environment(monkeypatch, tmp_path, setting, expected):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(compilation_cache.ENV, setting.format(tmp=tmp_path))
    got = compilation_cache.cache_dir()
    assert got == (None if expected is None else tmp_path / expected)


def test_jax_own_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-own"))
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "ours"))
    assert compilation_cache.cache_dir() == tmp_path / "jax-own"


@pytest.mark.slow
def test_configure_before_jax_is_imported(tmp_path):
    code = ("import sys; from mlmtool import compilation_cache as c; c.configure(); "
            "assert 'jax' not in sys.modules; import jax; print(jax.config.jax_compilation_cache_dir)")
    env = {**os.environ, compilation_cache.ENV: str(tmp_path / "c")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "c")


def _mlmtool(*args, cache: Path) -> tuple[str, str]:
    env = {**os.environ, compilation_cache.ENV: str(cache), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           # cache every program however fast it compiles, and log hits and misses
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    p = subprocess.run([sys.executable, "-m", "mlmtool", *map(str, args)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, p.stderr


def _entries(cache: Path, program: str) -> set[str]:
    return {p.name for p in cache.iterdir() if p.name.startswith(f"jit_{program}-")}


@pytest.mark.slow
def test_resume_and_eval_load_the_compiled_programs(tmp_path):
    d = prepared_dir(tmp_path)
    cache = tmp_path / "cache"
    train = ("train", d, "--max-steps", 2, "--save-steps", 1, "--per-device-train-batch-size", 8)
    _, log = _mlmtool(*train, cache=cache)
    assert "CACHE MISS for 'jit_train_step'" in log
    steps, evals = _entries(cache, "train_step"), _entries(cache, "eval_step")
    assert len(steps) == 1 and len(evals) == 1

    # Interrupted after step 1 (as if killed): the resumed run compiles nothing of its own.
    import shutil

    shutil.rmtree(d / "checkpoints" / "2")
    (d / "model.safetensors").unlink()
    out, log = _mlmtool(*train, cache=cache)
    assert "Resuming from checkpoint step 1" in out
    assert "cache hit for 'jit_train_step'" in log and "cache hit for 'jit_eval_step'" in log
    assert _entries(cache, "train_step") == steps

    _, log = _mlmtool("eval", d, cache=cache)  # at the training run's eval batch size, by default
    assert "cache hit for 'jit_eval_step'" in log
    assert _entries(cache, "eval_step") == evals
