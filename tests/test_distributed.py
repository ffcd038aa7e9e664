"""Scale-out: several processes (JAX's distributed runtime, CPU collectives over gloo) train
and evaluate exactly like one process with the same devices and global batch.

Every run is a subprocess with ``--xla_force_host_platform_device_count`` fake CPU devices:
two processes with 2 devices each against one process with 4.  A persistent compilation
cache shared by the subprocesses keeps the module at about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline import prepared_dir

pytestmark = pytest.mark.slow  # multi-process trainings

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# Global batch 16 = 4 per device x 4 devices, whether 1 process x 4 devices or 2 x 2.
TRAIN = ("--max-steps", STEPS, "--per-device-train-batch-size", 4, "--learning-rate", 1e-3, "--warmup-steps", 1,
         "--logging-steps", 1, "--save-steps", 2)
TIMEOUT = 300

# Runs the CLI with test hooks around mlmtool.training.checkpoint.save (nothing of this is in the package):
#   MLMTOOL_TEST_KILL_AT_SAVE=N  SIGKILL this process when the loop is about to save step N
#                                (after every earlier checkpoint has been written);
#   MLMTOOL_TEST_SHARDINGS=PATH  write the sharding of params and optimizer state there (a "%p"
#                                in PATH: the process index, each process its own file);
#   MLMTOOL_TEST_SIGTERM_AT_SAVE=N:P  send SIGTERM to process P (only) at step N's save.
# It also lets every process write the persistent compilation cache (JAX lets only process 0,
# and the other processes' cache keys differ), so that later runs in this module compile nothing.
RUNNER = r"""
import json, os, signal, sys
import jax
import mlmtool.training.checkpoint as ckpt

try:  # test speed only: every process writes its own compilation cache entries
    from jax._src import compiler, distributed

    _write = compiler._cache_write

    def _write_from_any_process(*args, **kwargs):
        pid = distributed.global_state.process_id
        distributed.global_state.process_id = 0
        try:
            return _write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = pid

    compiler._cache_write = _write_from_any_process
except Exception:
    pass

kill_at = int(os.environ.get("MLMTOOL_TEST_KILL_AT_SAVE", "0"))
shardings = os.environ.get("MLMTOOL_TEST_SHARDINGS")
term_at = [int(x) for x in os.environ.get("MLMTOOL_TEST_SIGTERM_AT_SAVE", "-1:-1").split(":")]
save = ckpt.save

def hooked(mngr, step, params, opt_state, meta):
    path = (shardings or "").replace("%p", str(jax.process_index()))
    if path and not os.path.exists(path):
        leaves = jax.tree_util.tree_flatten_with_path({"params": params, "opt_state": opt_state})[0]
        out = {jax.tree_util.keystr(k): {"spec": [str(a) for a in x.sharding.spec], "shape": list(x.shape),
                                         "shard": list(x.addressable_shards[0].data.shape)}
               for k, x in leaves if hasattr(x, "sharding")}
        with open(path, "w") as f:
            json.dump(out, f)
    if [step, jax.process_index()] == term_at:
        os.kill(os.getpid(), signal.SIGTERM)
    if step == kill_at:
        mngr.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(mngr, step, params, opt_state, meta)

ckpt.save = hooked
sys.argv = ["mlmtool", *sys.argv[1:]]
from mlmtool.cli import main
main()
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepared_dir(tmp_path_factory.mktemp("dist"), extra_set=("num_hidden_layers=1",))  # fast to compile


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "model.safetensors", "metrics.jsonl",
                                                            "eval_results.json", "tensorboard"))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLMTOOL_")}
    env.update({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "COLUMNS": "200", **{k: str(v) for k, v in extra.items()}})
    return env


class Launch:
    """``mlmtool ARGS`` started as ``processes`` processes (a coordinator on a free local port)
    with ``devices`` fake CPU devices each; :meth:`wait` gives [(returncode, output)]."""

    def __init__(self, args, *, processes: int, devices: int, cache: Path, log_dir: Path, per_process_args=None,
                 **env):
        port = _free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.what = f"{args[0]} with {processes} process(es)"
        self.procs, self.logs = [], []
        for i in range(processes):
            dist = () if processes == 1 else ("--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                                              processes, "--process-id", i)
            extra = per_process_args[i] if per_process_args else ()
            cmd = [sys.executable, "-c", RUNNER, *map(str, args), *map(str, dist), *map(str, extra)]
            log = open(log_dir / f"process{i}.log", "w+")
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, cache, **env), stdout=log,
                                               stderr=subprocess.STDOUT))
            self.logs.append(log)

    def wait(self, timeout: float = TIMEOUT) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            for p in self.procs:
                p.wait()
            pytest.fail(f"{self.what} did not finish in {timeout} s:\n" + "\n".join(self._read()))
        return [(p.returncode, text) for p, text in zip(self.procs, self._read())]

    def _read(self) -> list[str]:
        out = []
        for log in self.logs:
            log.seek(0)
            out.append(log.read())
            log.close()
        return out


def launch(args, **kwargs) -> list[tuple[int, str]]:
    timeout = kwargs.pop("timeout", TIMEOUT)
    return Launch(args, **kwargs).wait(timeout)


def _ok(results) -> list[str]:
    for i, (rc, text) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{text}"
    return [text for _, text in results]


def _metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def _losses(d: Path) -> dict[int, dict]:
    return {m["step"]: m for m in _metrics(d) if "loss" in m}  # a resumed step's newest line wins


def _params(d: Path) -> dict:
    from mlmtool.hf_weights import read_safetensors

    return read_safetensors(d / "model.safetensors")


def _max_param_diff(a: Path, b: Path) -> float:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    return max(float(np.max(np.abs(pa[k] - pb[k]))) for k in pa)


def _assert_same_training(a: Path, b: Path, *, loss_tol: float = 1e-5, param_tol: float = 1e-5) -> tuple[float, float]:
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    loss_diff = max(abs(la[s]["loss"] - lb[s]["loss"]) for s in la)
    for s in la:
        assert la[s]["masked_tokens"] == lb[s]["masked_tokens"], s  # the same rows and masks
        assert abs(la[s]["loss"] - lb[s]["loss"]) <= loss_tol, (s, la[s], lb[s])
    param_diff = _max_param_diff(a, b)
    assert param_diff <= param_tol
    print(f"\n{b.parent.name} vs {a.parent.name}: max loss difference {loss_diff:.2e}, "
          f"max parameter difference {param_diff:.2e}")
    return loss_diff, param_diff


@pytest.fixture(scope="module")
def runs(prepared, cache, tmp_path_factory) -> dict[str, tuple[Path, list]]:
    """Four runs of the same training (global batch 16), started together to use both cores:
    "one": 1 process x 4 devices (the reference), "two": 2 processes x 2 devices,
    "fsdp": 1 process x 4 devices with --mesh data=2,fsdp=2, "fsdp2": 2 processes x 2 devices
    with --mesh data=1,fsdp=4, the parameters split over both processes' devices (the
    shardings of the fsdp runs recorded)."""
    setups = {"one": dict(processes=1, devices=4), "two": dict(processes=2, devices=2),
              "fsdp": dict(processes=1, devices=4, extra=("--mesh", "data=2,fsdp=2")),
              "fsdp2": dict(processes=2, devices=2, extra=("--mesh", "data=1,fsdp=4"))}
    record = {"one": "shardings.json", "fsdp": "shardings.json", "fsdp2": "shardings-%p.json"}
    started = {}
    for name, setup in setups.items():
        d = _copy(prepared, tmp_path_factory.mktemp(name) / "m")
        started[name] = (d, Launch(("train", d, *TRAIN, *setup.get("extra", ())), processes=setup["processes"],
                                   devices=setup["devices"], cache=cache, log_dir=d.parent,
                                   MLMTOOL_TEST_SHARDINGS=d.parent / record[name] if name in record else ""))
    return {name: (d, run.wait()) for name, (d, run) in started.items()}


@pytest.fixture(scope="module")
def one_process(runs) -> Path:
    d, results = runs["one"]
    _ok(results)
    return d


@pytest.fixture(scope="module")
def two_processes(runs) -> tuple[Path, list[str]]:
    d, results = runs["two"]
    return d, _ok(results)


def test_two_processes_train_like_one(one_process, two_processes):
    d, (out0, out1) = two_processes
    _assert_same_training(one_process, d)
    # Process 0 alone logs, writes metrics.jsonl (one line per step, not two), exports.
    assert "2 processes" in out0 and "step 4/4" in out0 and "Done: step 4" in out0
    assert "step " not in out1.replace("step 4;", "") and "Done" not in out1 and "error" not in out1.lower()
    assert len([m for m in _metrics(d) if "loss" in m]) == STEPS
    assert len([m for m in _metrics(d) if "eval_loss" in m]) == 1
    assert (d / "model.safetensors").exists() and (d / "manifest.json").exists()
    assert not (d / ".mlmtool.runtime.lock").exists()
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    # The in-training evaluation is the same too (same rows, same masks, near-equal params).
    ev1 = [m for m in _metrics(d) if "eval_loss" in m][0]
    ev0 = [m for m in _metrics(one_process) if "eval_loss" in m][0]
    assert ev1["eval_tokens"] == ev0["eval_tokens"] and abs(ev1["eval_loss"] - ev0["eval_loss"]) <= 1e-5


def test_fsdp_mesh_shards_params_and_matches_data_parallel(runs, one_process):
    d, results = runs["fsdp"]
    _ok(results)
    _assert_same_training(one_process, d)
    info = json.loads((d.parent / "shardings.json").read_text())
    params = {k: v for k, v in info.items() if k.startswith("['params']")}
    sharded = {k: v for k, v in params.items() if "fsdp" in v["spec"]}
    # Every matrix (embeddings, attention, MLP) is split in two over fsdp, e.g. the word embeddings.
    emb = next(v for k, v in params.items() if "word_embeddings" in k)
    assert emb["spec"][0] == "fsdp" and emb["shard"] == [emb["shape"][0] // 2, emb["shape"][1]]
    assert all(v in sharded.values() for v in params.values() if len(v["shape"]) == 2)
    total = sum(int(np.prod(v["shape"])) for v in params.values())
    held = sum(int(np.prod(v["shard"])) for v in params.values())
    assert held < 0.55 * total, (held, total)  # each device holds about half the parameters
    # ... and so is the optimizer state (Adam's moments follow the params).
    mu = [v for k, v in info.items() if k.startswith("['opt_state']") and "word_embeddings" in k]
    assert mu and all(v["spec"][0] == "fsdp" for v in mu)
    # Plain data parallelism replicates everything.
    assert all(not any(v["spec"]) for v in json.loads((one_process.parent / "shardings.json").read_text()).values())


def test_fsdp_across_two_processes_trains_like_one(runs, one_process):
    """FSDP over 4 devices of 2 processes (each holds a quarter of every matrix, half of them on
    each host): the same losses and weights as 1 process with plain data parallelism, within the
    float32 reordering of the sums (1e-5, as the 1-process FSDP run)."""
    d, results = runs["fsdp2"]
    out0, out1 = _ok(results)
    assert "Done: step 4" in out0 and "Done" not in out1
    _assert_same_training(one_process, d, loss_tol=1e-5, param_tol=1e-5)
    for process in (0, 1):
        info = json.loads((d.parent / f"shardings-{process}.json").read_text())
        params = {k: v for k, v in info.items() if k.startswith("['params']")}
        assert params and len(params) == len([k for k in info if k.startswith("['params']")])
        for k, v in params.items():
            if len(v["shape"]) == 2:  # every matrix: a quarter on each device, split on one dimension
                dim = v["spec"].index("fsdp")
                assert v["shard"][dim] * 4 == v["shape"][dim] and v["shard"][1 - dim] == v["shape"][1 - dim], k
            elif "LayerNorm" in k or "layer_norm" in k:
                assert "fsdp" not in v["spec"] and v["shard"] == v["shape"], k  # norms replicated
        moments = [v for k, v in info.items() if k.startswith("['opt_state']") and "word_embeddings" in k]
        assert moments and all("fsdp" in v["spec"] for v in moments)


def test_killed_two_process_run_resumes_exactly(prepared, two_processes, cache, tmp_path):
    reference, _ = two_processes
    d = _copy(prepared, tmp_path / "m")
    # Both processes die (SIGKILL) at step 4's save: step 2's checkpoint is the last one.
    killed = launch(("train", d, *TRAIN), processes=2, devices=2, cache=cache, log_dir=tmp_path / "killed",
                    MLMTOOL_TEST_KILL_AT_SAVE=4)
    assert all(rc != 0 for rc, _ in killed), killed
    assert not (d / "model.safetensors").exists()
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    out0, _ = _ok(launch(("train", d, *TRAIN), processes=2, devices=2, cache=cache, log_dir=tmp_path / "resumed"))
    assert "Resuming from checkpoint step 2" in out0, out0
    la, lb = _losses(reference), _losses(d)
    for s in range(1, STEPS + 1):
        assert la[s]["loss"] == lb[s]["loss"], (s, la[s], lb[s])
    pa, pb = _params(reference), _params(d)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_signal_to_one_process_stops_all_at_the_same_step(prepared, two_processes, cache, tmp_path):
    d = _copy(prepared, tmp_path / "m")
    # Process 1 alone gets SIGTERM (at step 2's save); both finish step 3, save it and stop.
    (rc0, out0), (rc1, out1) = launch(("train", d, *TRAIN), processes=2, devices=2, cache=cache, log_dir=tmp_path,
                                      MLMTOOL_TEST_SIGTERM_AT_SAVE="2:1")
    assert rc0 == rc1 == 1, (out0, out1)
    assert "stopped at step 3 by a signal to another process; checkpoint saved" in out0, out0
    assert "stopped at step 3 by SIGTERM; checkpoint saved" in out1, out1
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert not (d / "model.safetensors").exists() and not (d / ".mlmtool.runtime.lock").exists()


def test_eval_two_processes_matches_one(two_processes, cache, tmp_path):
    """The export, read on every host (checkpoints are restored collectively in the resume test)."""
    from tests.pipeline import invoke

    d, _ = two_processes
    out0, out1 = _ok(launch(("eval", d, "--json", "--checkpoint", "export", "--per-device-eval-batch-size", 4),
                            processes=2, devices=2, cache=cache, log_dir=tmp_path))
    multi = json.loads(out0.strip().splitlines()[-1])
    assert multi["checkpoint"] == "export" and "eval_loss" not in out1  # process 0 reports
    assert json.loads((d / "eval_results.json").read_text()) == multi
    r = invoke("eval", d, "--json", "--checkpoint", "export", "--per-device-eval-batch-size", 32)  # 1 device
    assert r.exit_code == 0, r.output
    single = json.loads(r.output)
    assert multi["eval_tokens"] == single["eval_tokens"] and multi["eval_samples"] == single["eval_samples"]
    assert multi["eval_accuracy"] == pytest.approx(single["eval_accuracy"], abs=1e-9)
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
    print(f"\neval, 2 processes vs 1: loss {multi['eval_loss']!r} vs {single['eval_loss']!r}")


def test_processes_with_different_settings_fail_together(prepared, cache, tmp_path):
    d = _copy(prepared, tmp_path / "m")
    t = time.monotonic()
    results = launch(("train", d, "--max-steps", 2, "--save-steps", 10), processes=2, devices=2, cache=cache,
                     log_dir=tmp_path, per_process_args=[("--per-device-train-batch-size", 4, "--seed", 1),
                                                         ("--per-device-train-batch-size", 2, "--seed", 1)],
                     timeout=120)
    elapsed = time.monotonic() - t
    for rc, text in results:
        assert rc == 1, text
        assert "--per-device-train-batch-size is 4 on process 0 but 2 on process 1" in text, text
        assert "Traceback" not in text
    assert elapsed < 90
    assert not (d / "checkpoints").exists() and not (d / ".mlmtool.runtime.lock").exists()


def test_unreachable_coordinator_is_one_line_error(prepared, tmp_path):
    env = _env(1, tmp_path / "cache")
    cmd = [sys.executable, "-m", "mlmtool", "train", str(prepared), "--coordinator-address",
           f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3"]
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    assert time.monotonic() - t < 60
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the coordinator at 127.0.0.1:"), p.stderr
    # Incomplete flags are refused before anything starts.
    p = subprocess.run([sys.executable, "-m", "mlmtool", "train", str(prepared), "--num-processes", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--coordinator-address, --process-id" in p.stderr, p.stderr
