"""Interrupted runs, concurrent commands and NaN losses lose nothing.

Real subprocesses get real signals: SIGTERM and SIGINT stop training after the step with a
checkpoint, SIGKILL at a random step and in the middle of a checkpoint save leave a directory
that resumes, and the resumed run ends bit-identical to an uninterrupted one.  ``prepare`` and
``tokenizer`` killed mid-run leave no half-written artefact.  Two commands on one directory:
the second is refused naming the holder; a dead holder's lock is taken over.  A diverging run
stops with the step and the cause, and writes no checkpoint of the broken weights.  Loading a
model directory never executes code (a grep of the package source).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest

from tests.pipeline import WORDS, invoke, prepared_dir

pytestmark = pytest.mark.slow  # trainings killed and resumed in subprocesses

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "PYTHONUNBUFFERED": "1", "MLMTOOL_DEBUG": ""}
TRAIN = ["--max-steps", "12", "--per-device-train-batch-size", "8", "--learning-rate", "1e-3",
         "--warmup-steps", "2", "--logging-steps", "1", "--save-steps", "2", "--save-total-limit", "3"]

# `mlmtool` in a subprocess, with two test hooks: MLMTOOL_TEST_PACE sleeps that many seconds
# per step, in the training log's action (numerics untouched, so that a signal lands mid-run), MLMTOOL_TEST_KILL_IN_SAVE
# SIGKILLs the process as soon as the first checkpoint write of the run is in flight.
_MLMTOOL = r"""
import os, signal, sys, time
pace = float(os.environ.get("MLMTOOL_TEST_PACE") or 0)
if pace or os.environ.get("MLMTOOL_TEST_KILL_IN_SAVE"):
    from mlmtool.training import checkpoint, periodic
    if pace:
        log = periodic.MetricsLog.__call__
        def paced(self, *a, **k):
            time.sleep(pace)
            return log(self, *a, **k)
        periodic.MetricsLog.__call__ = paced
    if os.environ.get("MLMTOOL_TEST_KILL_IN_SAVE"):
        save = checkpoint.save
        def save_then_die(mngr, step, *a, **k):
            save(mngr, step, *a, **k)  # asynchronous: the write is in flight now
            print(f"KILLED IN SAVE {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save = save_then_die
from mlmtool.cli import main
sys.argv = ["mlmtool", *sys.argv[1:]]
main()
"""


class Run:
    """One ``mlmtool`` subprocess in its own session, output in files."""

    def __init__(self, tmp: Path, name: str, *args, env: dict | None = None):
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen([sys.executable, "-c", _MLMTOOL, *self.args], cwd=ROOT,
                                  env={**ENV, **(env or {})}, stdout=self._out, stderr=self._err,
                                  start_new_session=True)
        self.pid = self.p.pid

    @property
    def out(self) -> str:
        """stdout and stderr, whitespace normalised."""
        return " ".join((self.out_path.read_text() + "\n" + self.err_path.read_text()).split())

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.p.wait(timeout)
        finally:
            self._out.close()
            self._err.close()
        return rc

    def stop(self) -> None:
        """Kill what is left of it (its session: prepare's worker processes included)."""
        if self.p.poll() is None:
            self.p.kill()
        with _suppress():
            os.killpg(self.pid, signal.SIGKILL)
        with _suppress():
            self.p.wait(30)
        self._out.close()
        self._err.close()

    def __repr__(self) -> str:
        return f"mlmtool {' '.join(self.args)} (pid {self.pid})\n{self.out}"


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, subprocess.TimeoutExpired))


def wait_for(condition, timeout: float = 240, what: str = "", run: Run | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.p.poll() is not None:
            raise AssertionError(f"exited ({run.p.returncode}) while waiting for {what}: {run!r}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}" + (f": {run!r}" if run else ""))


class Steps:
    """The last training step logged to DIR/metrics.jsonl since this object was made."""

    def __init__(self, d: Path):
        self.path = d / "metrics.jsonl"
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def last(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1].decode()  # a line may be half-written as we read
        steps = [json.loads(x)["step"] for x in complete.splitlines() if '"loss"' in x]
        return max(steps, default=0)


def complete_steps(d: Path) -> list[int]:
    from mlmtool.modeldir import checkpoint_steps

    return checkpoint_steps(d / "checkpoints")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    # The subprocesses share a JAX compilation cache: each compiles in seconds, not tens.
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return prepared_dir(tmp_path_factory.mktemp("reliability"))


# -- interruptions during train ------------------------------------------------------------

def test_sigterm_sigint_sigkill_and_kill_mid_save_resume_bit_identical(prepared, tmp_path):
    """One run interrupted four ways, resumed after each, ends with the parameters of an
    uninterrupted run (bit for bit on CPU)."""
    rng = random.Random()
    ref = _copy(prepared, tmp_path / "reference")
    reference = Run(tmp_path, "reference", "train", ref, *TRAIN)  # meanwhile, in parallel
    d = _copy(prepared, tmp_path / "model")
    paced = {"MLMTOOL_TEST_PACE": "0.3"}
    try:
        # 1. SIGTERM (preemption): finish the step, checkpoint, say how to resume, exit 1.
        steps, run = Steps(d), Run(tmp_path, "sigterm", "train", d, *TRAIN, env=paced)
        first = rng.randint(1, 3)
        wait_for(lambda: steps.last() >= first, what=f"step {first}", run=run)
        run.signal(signal.SIGTERM)
        assert run.wait() == 1, run
        stopped = int(re.search(r"stopped at step (\d+) by SIGTERM; checkpoint saved", run.out)[1])
        assert f"run 'mlmtool train {d}' again to resume" in run.out, run
        assert "Traceback" not in run.out, run
        assert complete_steps(d)[-1] == stopped == steps.last() < 12
        assert not (d / ".mlmtool.runtime.lock").exists()
        print(f"SIGTERM after step {first}: stopped at {stopped}")

        # 2. Resume, then Ctrl-C: the same, from where it stopped.
        steps, run = Steps(d), Run(tmp_path, "sigint", "train", d, *TRAIN, env=paced)
        wait_for(lambda: steps.last() >= stopped + 1, what="a step after resuming", run=run)
        run.signal(signal.SIGINT)
        assert run.wait() == 1, run
        assert f"Resuming from checkpoint step {stopped} " in run.out, run
        assert "press Ctrl-C again to stop at once" in run.out, run
        stopped = int(re.search(r"stopped at step (\d+) by SIGINT", run.out)[1])
        assert complete_steps(d)[-1] == stopped < 12, run
        print(f"SIGINT: stopped at {stopped}")

        # 3. SIGKILL while a checkpoint is being written: orbax's temporary folder is left,
        #    ignored by readers, and the previous checkpoint is the latest complete one.
        run = Run(tmp_path, "kill-in-save", "train", d, *TRAIN, env={"MLMTOOL_TEST_KILL_IN_SAVE": "1"})
        assert run.wait() == -signal.SIGKILL, run
        in_save = int(re.search(r"KILLED IN SAVE (\d+)", run.out)[1])
        print(f"SIGKILL while saving step {in_save}")
        leftovers = sorted(p.name for p in (d / "checkpoints").iterdir() if not p.name.isdigit())
        assert leftovers == [f"{in_save}.orbax-checkpoint-tmp"], leftovers
        assert complete_steps(d)[-1] == stopped < in_save
        assert (d / ".mlmtool.runtime.lock").exists()  # stale: its holder is dead
        r = invoke("eval", d, "--json")  # the directory stays readable
        assert r.exit_code == 0 and json.loads(r.stdout)["checkpoint"] == f"step {stopped}", r.output

        # 4. SIGKILL at a random moment of a random step (in a step, a save, an eval...).
        steps, run = Steps(d), Run(tmp_path, "sigkill", "train", d, *TRAIN, env=paced)
        target = rng.randint(stopped + 1, 11)
        print(f"SIGKILL after step {target}")
        wait_for(lambda: steps.last() >= target, what=f"step {target}", run=run)
        time.sleep(rng.uniform(0, 0.3))
        run.signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        assert f"Resuming from checkpoint step {stopped} " in run.out, run
        last = complete_steps(d)[-1]

        # 5. Resume to the end: the same parameters as the uninterrupted run.
        run = Run(tmp_path, "final", "train", d, *TRAIN)
        assert run.wait() == 0, run
        assert f"Resuming from checkpoint step {last} " in run.out, run
        assert reference.wait() == 0, reference
    finally:
        reference.stop()
    assert (d / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes(), \
        f"kill points: SIGTERM→{stopped}, in save {in_save}, SIGKILL after step {target}"
    assert complete_steps(d)[-1] == complete_steps(ref)[-1] == 12
    assert not [p for p in (d / "checkpoints").iterdir() if not p.name.isdigit()]  # tmp cleaned
    assert not (d / ".mlmtool.runtime.lock").exists()


def test_second_ctrl_c_stops_at_once_and_other_commands_are_refused_meanwhile(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "model")
    corpus = prepared.parent / "corpus.txt"
    steps = Steps(d)
    run = Run(tmp_path, "train", "train", d, "--max-steps", 1000, "--per-device-train-batch-size", 8,
              "--logging-steps", 1, "--save-steps", 1000, env={"MLMTOOL_TEST_PACE": "0.5"})
    try:
        wait_for(lambda: steps.last() >= 1, what="a first step", run=run)
        holder = json.loads((d / ".mlmtool.runtime.lock").read_text())
        assert holder["pid"] == run.pid and holder["command"] == "train"
        # Concurrency: train, prepare and tokenizer on the same DIR are refused, naming the holder.
        for args in (("train", d, "--max-steps", 2), ("prepare", d, corpus, "--max-seq-length", 32),
                     ("tokenizer", d, corpus, "--vocab-size", 300)):
            r = invoke(*args)
            assert r.exit_code == 1, r.output
            assert f"is in use by 'mlmtool train' (PID {run.pid} on {socket.gethostname()}" in r.output, r.output
            assert "wait for it to finish or stop it" in r.output and "Traceback" not in r.output
        # Ctrl-C twice: the first asks for a checkpoint after the step, the second stops at once.
        run.signal(signal.SIGINT)
        wait_for(lambda: "press Ctrl-C again" in run.out, timeout=60, what="the first Ctrl-C", run=run)
        t0 = time.monotonic()
        run.signal(signal.SIGINT)
        assert run.wait(60) == 130, run
        assert time.monotonic() - t0 < 20
        assert "interrupted" in run.out and "Traceback" not in run.out, run
    finally:
        run.stop()
    assert not (d / ".mlmtool.runtime.lock").exists()
    complete_steps(d)  # the checkpoint directory is readable (whatever it holds)
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10)
    assert r.exit_code == 0 and "Up to date" in r.output, r.output


# -- locks -----------------------------------------------------------------------------------

_HOLD_LOCK = r"""
import sys, time
from mlmtool.modeldir import ModelDir
with ModelDir(sys.argv[1]).lock("train"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(d: Path, pid: int, host: str | None = None) -> None:
    (d / ".mlmtool.runtime.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                 "command": "train", "time": "2020-01-01T00:00:00+00:00"}))


def test_lock_refuses_live_holder_and_takes_over_dead_ones(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "model")
    corpus = prepared.parent / "corpus.txt"
    prep = ("prepare", d, corpus, "--max-seq-length", 32, "--validation-split-percentage", 10, "--force")

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(d)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke(*prep)
        assert r.exit_code == 1 and f"(PID {holder.pid} on {socket.gethostname()}" in r.output, r.output
        holder.kill()  # kill -9: the kernel drops its lock, the file stays behind
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert json.loads((d / ".mlmtool.runtime.lock").read_text())["pid"] == holder.pid
    r = invoke(*prep)
    assert r.exit_code == 0 and "Prepared" in r.output, r.output
    assert not (d / ".mlmtool.runtime.lock").exists()

    # A stale file naming a dead PID, or a PID now reused by a live process (ours): taken over.
    for pid in (_dead_pid(), os.getpid()):
        _write_lock(d, pid)
        r = invoke(*prep)
        assert r.exit_code == 0, r.output
        assert not (d / ".mlmtool.runtime.lock").exists()

    # A holder on another host cannot be checked: refused, with how to clear it.
    _write_lock(d, 12345, host="some-other-host")
    r = invoke(*prep)
    assert r.exit_code == 1 and "PID 12345 on some-other-host" in r.output, r.output
    assert f"if it is no longer running, delete {d / '.mlmtool.runtime.lock'}" in r.output


def test_lock_without_flock_falls_back_to_pids(prepared, tmp_path, monkeypatch):
    import errno
    import fcntl

    from mlmtool.errors import ModelDirError
    from mlmtool.modeldir import ModelDir

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = ModelDir(_copy(prepared, tmp_path / "model"))
    for stale in (_dead_pid(), os.getpid()):  # a dead PID, or one reused (by us)
        _write_lock(d.path, stale)
        with d.lock("prepare"):
            assert json.loads((d / ".mlmtool.runtime.lock").read_text())["pid"] == os.getpid()
        assert not (d / ".mlmtool.runtime.lock").exists()
    _write_lock(d.path, os.getppid())  # alive
    with pytest.raises(ModelDirError, match=f"in use by 'mlmtool train' \\(PID {os.getppid()} "):
        with d.lock("prepare"):
            pass


# -- NaN -------------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    d = _copy(prepared, tmp_path / "model")
    r = invoke("train", d, "--max-steps", 20, "--per-device-train-batch-size", 8, "--learning-rate", 1e6,
               "--max-grad-norm", 0, "--logging-steps", 1, "--save-steps", 1)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    m = re.match(r"error: training diverged at step (\d+): the (loss became nan|loss became inf|weights became "
                 r"inf/nan): the learning rate \([0-9.e+]+ at that step\) is probably too high: lower "
                 r"--learning-rate", errors[0])
    assert m, errors[0]
    bad = int(m[1])
    assert "--max-grad-norm 1.0" in errors[0]
    steps = complete_steps(d)
    assert steps and steps[-1] == bad - 1, (steps, errors[0])  # nothing from the diverged step on
    assert f"the last good checkpoint (step {bad - 1}) is kept" in errors[0]
    logged = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in logged) < bad

    # The last good checkpoint restores, and its weights are finite.
    import jax
    import numpy as np

    from mlmtool.training import checkpoint
    from mlmtool.modeldir import ModelDir
    from mlmtool.models import load_model

    loaded = load_model(ModelDir(d).read_config())
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu),
                                      loaded.abstract_params)
    with checkpoint.manager(d / "checkpoints", read_only=True, async_save=False) as mngr:
        out = checkpoint.restore(mngr, bad - 1, abstract)
    assert out["meta"]["step"] == bad - 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(out["params"]))


# -- prepare and tokenizer killed mid-run ------------------------------------------------------

def _big_corpus(path: Path, mb: float = 6.0, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < mb * 1e6:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) + ".\n"
            f.write(line)
            size += len(line)
    return path


def _files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


_SLOW_PREPARE = r"""
import sys, time
from mlmtool.data import blocks
add = blocks.SplitWriter.add_stream
def slow(self, *args):  # a bigger corpus, in effect
    time.sleep(0.15)
    return add(self, *args)
blocks.SplitWriter.add_stream = slow
from mlmtool.cli import main
sys.argv = ["mlmtool", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find worker processes")
def test_prepare_killed_mid_run_leaves_the_previous_store_or_none(prepared, tmp_path):
    big = _big_corpus(tmp_path / "big.txt")
    rng = random.Random()
    d = _copy(prepared, tmp_path / "model")
    before = _files(d / "data")
    fresh = _copy(prepared, tmp_path / "fresh")
    shutil.rmtree(fresh / "data")
    for target in (d, fresh):
        p = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, "prepare", str(target), str(big),
                              "--max-seq-length", "32", "--num-proc", "2", "--force"],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            tmp = wait_for(lambda: [x for x in target.glob(".data.*") if (x / ".train.bin.tmp").exists()],
                           timeout=120, what="prepare's temporary store")[0]
            time.sleep(rng.uniform(0.2, 0.8))
            workers = _children(p.pid)
            assert p.poll() is None, "prepare finished before it could be killed"
            assert workers, "no worker processes"
            p.kill()
            assert p.wait() == -signal.SIGKILL
            # Its worker processes notice and exit (they would otherwise wait forever).
            wait_for(lambda: not any(_alive(w) for w in workers), timeout=15, what="the workers to exit")
        finally:
            if p.poll() is None:
                p.kill()
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        assert tmp.exists()  # a temporary folder, never read as a store
        if target is fresh:
            assert not (target / "data").exists()
        else:
            assert _files(target / "data") == before
        # The next prepare finds the previous store up to date, or takes the dead run's lock,
        # removes its leftovers and builds one.
        args = ("prepare", target, prepared.parent / "corpus.txt", "--max-seq-length", 32,
                "--validation-split-percentage", 10)
        r = invoke(*args)
        assert r.exit_code == 0, r.output
        assert ("Up to date" in r.output) == (target is d), r.output
        if target is d:
            assert _files(d / "data") == before
            r = invoke(*args, "--force")
            assert r.exit_code == 0, r.output
        assert not [x.name for x in target.iterdir() if x.name.startswith(".")], list(target.iterdir())


_KILL_AT_TOKENIZER_JSON = r"""
import os, signal, sys
replace = os.replace
final = os.path.abspath(os.path.join(os.environ["KILL_DIR"], "tokenizer.json"))
def replace_or_die(src, dst, *a, **k):
    if os.path.abspath(dst) == final:  # config.json written, tokenizer.json next
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *a, **k)
os.replace = replace_or_die
from mlmtool.cli import main
sys.argv = ["mlmtool", *sys.argv[1:]]
main()
"""


def test_tokenizer_killed_mid_run_leaves_no_tokenizer_or_a_complete_one(prepared, tmp_path):
    from tokenizers import Tokenizer

    big = _big_corpus(tmp_path / "big.txt", mb=4)
    d = _copy(prepared, tmp_path / "model")
    old = (d / "tokenizer.json").read_bytes()
    # A random moment of a real run on a bigger corpus: the old tokenizer stays, or a new one
    # agreeing with config.json is complete.
    p = subprocess.Popen([sys.executable, "-m", "mlmtool", "tokenizer", str(d), str(big), "--vocab-size", "400"],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (d / ".mlmtool.runtime.lock").exists() or p.poll() is not None, timeout=120, what="the lock")
    time.sleep(random.uniform(0, 1.5))
    p.kill()
    p.wait()
    config = json.loads((d / "config.json").read_text())
    if (d / "tokenizer.json").exists():
        assert Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size() == config["vocab_size"]

    # Killed right before tokenizer.json is renamed into place (config.json already written):
    # no tokenizer.json, so the next step says to run 'mlmtool tokenizer', not a mismatch.
    p = subprocess.run([sys.executable, "-c", _KILL_AT_TOKENIZER_JSON, "tokenizer", str(d), str(big),
                        "--vocab-size", "350"], cwd=ROOT, env={**ENV, "KILL_DIR": str(d)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not (d / "tokenizer.json").exists()
    json.loads((d / "config.json").read_text())  # whole
    assert list(d.glob(".tokenizer.*.tmp"))
    r = invoke("prepare", d, big, "--max-seq-length", 32)
    assert r.exit_code == 1 and "no tokenizer" in r.output and "mlmtool tokenizer" in r.output, r.output
    r = invoke("tokenizer", d, prepared.parent / "corpus.txt", "--vocab-size", 300)
    assert r.exit_code == 0, r.output
    assert (d / "tokenizer.json").read_bytes() == old  # the same corpus and options: the same tokenizer
    assert not [x.name for x in d.iterdir() if x.name.startswith(".")]


# -- security --------------------------------------------------------------------------------

_FORBIDDEN = [
    (re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b"), "pickle-like deserialisation"),
    (re.compile(r"trust_remote_code\s*=\s*(True|1)\b"), "trust_remote_code=True"),
    (re.compile(r"\btorch\.load\b"), "torch.load"),
    (re.compile(r"allow_pickle\s*=\s*(True|1)\b"), "allow_pickle=True"),
    (re.compile(r"(?<![\w.])(eval|exec)\s*\("), "eval()/exec()"),
    (re.compile(r"\byaml\.(unsafe_)?load\s*\("), "yaml.load"),
]


def _code_only(source: str) -> str:
    """``source`` with its comments and string literals (docstrings, messages) blanked out."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            lo, hi = (c0 if r == r0 else 0), (c1 if r == r1 else len(line))
            for c in range(lo, min(hi, len(line))):
                if line[c] != "\n":
                    line[c] = " "
    return "".join("".join(line) for line in lines)


def test_loading_a_model_directory_never_executes_code():
    files = sorted((ROOT / "mlmtool").rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        for n, line in enumerate(_code_only(path.read_text(encoding="utf-8")).splitlines(), 1):
            for pattern, what in _FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)
    # The scan itself finds what it looks for.
    assert _FORBIDDEN[0][0].search(_code_only("import pickle\n"))
    assert _FORBIDDEN[4][0].search(_code_only("x = eval(s)  # no\n"))
    assert not _FORBIDDEN[4][0].search(_code_only("model.eval()\njax.eval_shape(f)\n'eval('\n"))
