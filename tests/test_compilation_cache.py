"""The CLI's persistent compilation cache: where it goes, how it is turned off, and that a
resumed ``train`` and an ``eval`` load the compiled programs instead of compiling again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlmtool.runtime import compilation_cache
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
    code = ("import sys; from mlmtool.runtime import compilation_cache as c; c.configure(); "
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


# -- a cache that cannot be used: one warning line naming the setting, and the command runs ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from tests.pipeline import trained_dir

    return trained_dir(tmp_path_factory)


def _predict(d: Path, cache: Path, *, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``mlmtool predict`` in a fresh process that caches every program; ``max_file_bytes``
    (RLIMIT_FSIZE) makes every longer write fail with EFBIG, as a full disk cuts a write short."""
    env = {**os.environ, compilation_cache.ENV: str(cache), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    for name in ("JAX_COMPILATION_CACHE_DIR", "MLMTOOL_DEBUG"):
        env.pop(name, None)
    args = ["predict", str(d), "the king <mask> good night", "--json"]
    limit = (f"import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes})); "
             if max_file_bytes else "")
    code = f"{limit}import sys; sys.argv = ['mlmtool', *{args!r}]; from mlmtool.cli import main; main()"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "the king" in p.stdout, p.stdout  # the predictions, whatever the cache did
    return p


def _warning(p: subprocess.CompletedProcess) -> str:
    """The only thing on stderr: one ``warning:`` line (none of jax's)."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: compilation cache "), p.stderr
    return lines[0]


def _unwritable_parent(tmp_path: Path) -> Path:
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").mkdir()
    except PermissionError:
        return parent / "cache"
    pytest.skip("this user writes into a read-only folder (root): /proc covers an unwritable parent")


@pytest.mark.parametrize("where, error", [
    ("a file", "it is a file, not a folder"),
    ("under a file", "Not a directory"),
    ("under /proc", "No such file or directory"),  # unwritable even for root
    ("under a read-only folder", "Permission denied"),
])
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_a_cache_that_cannot_be_used_is_one_warning(trained, tmp_path, where, error):
    (tmp_path / "file").write_text("not a folder")
    cache = {"a file": lambda: tmp_path / "file", "under a file": lambda: tmp_path / "file" / "cache",
             "under /proc": lambda: Path("/proc/mlmtool-cache"),
             "under a read-only folder": lambda: _unwritable_parent(tmp_path)}[where]()
    line = _warning(_predict(trained, cache))
    assert f"compilation cache {compilation_cache.ENV}={cache} cannot be used ({error}" in line, line
    assert "compiling without it; set MLMTOOL_COMPILATION_CACHE to a writable folder, or to 0" in line, line
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_a_write_cut_short_is_named_and_deleting_the_cache_as_told_works(trained, tmp_path):
    """A full disk cuts jax's (non-atomic) writes short; the truncated entries then fail to
    load on every later run and are never replaced: the warning says to delete the folder."""
    cache = tmp_path / "cache"
    line = _warning(_predict(trained, cache, max_file_bytes=1000))
    assert f"{compilation_cache.ENV}={cache} cannot be written (File too large): compiled programs are not kept" \
        in line and f"free some space and delete {cache} (a write cut short leaves a damaged entry)" in line, line
    assert any(p.stat().st_size == 1000 for p in cache.iterdir())  # the damage
    line = _warning(_predict(trained, cache))
    assert f"compilation cache {compilation_cache.ENV}={cache} holds a damaged entry (" in line, line
    assert f"delete {cache} (it is rebuilt), or set MLMTOOL_COMPILATION_CACHE to 0" in line, line
    import shutil

    shutil.rmtree(cache)  # as the hint says
    p = _predict(trained, cache)
    assert not p.stderr.strip(), p.stderr
    entries = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    assert entries and all(p.stat().st_size > 1000 for p in entries)


def test_jax_s_cache_warnings_become_one_line_and_others_pass(monkeypatch, capsys, tmp_path):
    import warnings

    monkeypatch.setitem(compilation_cache._state, "path", tmp_path / "c")
    monkeypatch.setitem(compilation_cache._state, "setting", f"{tmp_path / 'c'} (the default)")
    monkeypatch.setitem(compilation_cache._state, "warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.showwarning = compilation_cache._show_once(warnings.showwarning)
        for name in ("jit_a", "jit_b"):
            warnings.warn(f"Error writing persistent compilation cache entry for '{name}': PermissionError: "
                          f"[Errno 13] Permission denied: '{tmp_path}/c/x'")
        warnings.warn("something else")
    assert [str(w.message) for w in seen] == ["something else"]
    err = " ".join(capsys.readouterr().err.split())
    assert err == (f"warning: compilation cache {tmp_path / 'c'} (the default) cannot be written (Permission "
                   f"denied: '{tmp_path}/c/x'): compiled programs are not kept; set MLMTOOL_COMPILATION_CACHE "
                   f"to a writable folder, or to 0 to turn the cache off"), err
    assert compilation_cache.unusable("Error reading persistent compilation cache entry") is None
