"""``prepare --num-shards N``: the cut, the per-shard store, and the ways of filling it that
must give the same store (one process, concurrent processes, object storage, Ray, a kill -9
and a re-run), read by train as any store."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlmtool.data import shard_plan, shards
from mlmtool.data.blocks import BlockStore, validation_mask
from mlmtool.cli import app
from mlmtool.data.corpus import open_corpus
from mlmtool.data.prepare import prepare
from tests.pipeline import error_line
from tests.conftest import make_documents, write_documents

ROOT = Path(__file__).resolve().parents[1]
N = 4


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    """Two text files (cut by byte range), a jsonl file and a gzip file (whole files)."""
    docs = make_documents(900, seed=3)
    d = tmp_path / "corpus"
    a = write_documents(d / "a.txt", docs[:500])
    b = write_documents(d / "b.txt", docs[500:700])
    c = d / "c.jsonl"
    c.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[700:800]), encoding="utf-8")
    e = d / "e.txt.gz"
    e.write_bytes(gzip.compress("".join(t + "\n" for t in docs[800:]).encode()))
    return [a, b, c, e]


def model_copy(bpe_dir: Path, name: str) -> Path:
    return Path(shutil.copytree(bpe_dir, bpe_dir.parent / name, ignore=shutil.ignore_patterns("data", ".data*")))


def fingerprint(d: Path) -> dict:
    r = invoke("info", d, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["data"]["fingerprint"]


def run_prepare(d: Path, files, **kw) -> dict:
    return prepare(d, open_corpus([str(f) for f in files]), max_seq_length=16, show_progress=False,
                   num_shards=kw.pop("num_shards", N), **kw)


@pytest.fixture
def reference(bpe_dir, inputs) -> tuple[Path, dict]:
    """--num-shards 4 in one process: the store every other way must give."""
    d = model_copy(bpe_dir, "reference")
    result = run_prepare(d, inputs, num_proc=2)
    assert result["status"] == "written" and result["num_shards"] == N
    return d, fingerprint(d)


# -- the cut ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 50])
def test_cut_gives_every_line_to_the_shard_its_start_falls_in(inputs, n):
    corpus = open_corpus([str(p) for p in inputs])
    pieces = shard_plan.cut(corpus.sources, n)
    total = sum(s.size for s in corpus.sources)
    bounds = [k * total // n for k in range(n + 1)]
    expected: list[list[str]] = [[] for _ in range(n)]
    offset = 0
    for src in corpus.sources:
        whole = None if src.splittable else min(n - 1, max(k for k in range(n) if bounds[k] <= offset))
        if src.splittable:
            pos = 0
            for line in src.path.read_bytes().splitlines(keepends=True):
                k = max(k for k in range(n) if bounds[k] <= offset + pos)
                text = line.decode().rstrip("\n")
                if src.format == "jsonl":
                    text = json.loads(text)["text"]
                expected[k].append(text)
                pos += len(line)
        else:
            expected[whole] += gzip.decompress(src.path.read_bytes()).decode().splitlines()
        offset += src.size
    for k in range(n):
        for batch_bytes in (100, 1 << 20):
            got = [doc for b in open_corpus_of(pieces[k], corpus).batches(batch_bytes, allow_empty=True)
                   for doc in b.documents]
            assert got == expected[k], (n, k, batch_bytes)
    assert sum(map(len, expected)) == 900


def open_corpus_of(pieces, corpus):
    from mlmtool.data.corpus import Corpus

    return Corpus(list(pieces), text_column=corpus.text_column)


def test_phase_spreads_validation_over_small_shards():
    assert [shard_plan.phase(k, 4, 5.0) for k in range(4)] == [0, 5, 10, 15]
    assert shard_plan.phase(3, 1, 5.0) == 0 and shard_plan.phase(2, 4, 0.0) == 0
    # 4 shards of 10 documents at 5 %: 2 held out in all (one stream of 40 holds 2), not 0
    assert sum(int(validation_mask(shard_plan.phase(k, 4, 5.0), 10, 5.0).sum()) for k in range(4)) == 2


def test_process_share_from_the_environment():
    assert shard_plan.process_share(5, {}) is None
    assert shard_plan.process_share(5, {"MLMTOOL_NUM_PROCESSES": "2", "MLMTOOL_PROCESS_ID": "1"}) == [1, 3]
    assert shard_plan.process_share(4, {"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}) == [0, 3]
    assert shard_plan.process_share(4, {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "6",
                                    "SLURM_ARRAY_TASK_MIN": "5"}) == [1, 3]
    assert shard_plan.process_share(6, {"TPU_WORKER_HOSTNAMES": "a,b,c", "TPU_WORKER_ID": "2"}) == [2, 5]


# -- the store -------------------------------------------------------------------------------

def test_sharded_store_is_each_shard_packed_on_its_own(reference, inputs):
    from tokenizers import Tokenizer

    d, fp = reference
    meta = json.loads((d / "data" / "meta.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    corpus = open_corpus([str(p) for p in inputs])
    want = {"train": [], "validation": []}
    for k, pieces in enumerate(shard_plan.cut(corpus.sources, N)):
        docs = [x for b in open_corpus_of(pieces, corpus).batches(allow_empty=True) for x in b.documents]
        val = validation_mask(shard_plan.phase(k, N, 5.0), len(docs), 5.0)
        for split, keep in (("train", ~val), ("validation", val)):
            flat = [t for doc, v in zip(docs, keep) if v for t in tok.encode(doc).ids]
            want[split].append(np.array(flat[:len(flat) // 16 * 16]).reshape(-1, 16))
    for split in ("train", "validation"):
        store = BlockStore.open(d / "data", split)
        expected = np.concatenate(want[split])
        assert np.array_equal(store.read_range(0, len(store)), expected)
        rng = np.random.default_rng(0)  # random reads across shard files
        idx = rng.integers(0, len(store), 50)
        assert np.array_equal(store.read(idx), expected[idx])
        # per-shard packing drops each shard's remainder: fewer blocks than one stream by at most N - 1
        assert 0 <= meta["packing_loss_blocks"][split] <= N - 1
    assert meta["num_shards"] == N and len(meta["shards"]) == N
    assert fp["num_blocks"] == meta["num_blocks"] and len(fp["train"]) == 64
    assert invoke("prepare", d, "--verify").exit_code == 0


def test_one_shard_is_todays_store(bpe_dir, inputs):
    d = model_copy(bpe_dir, "one")
    run_prepare(d, inputs, num_shards=1)
    names = {p.name for p in (d / "data").iterdir()}
    assert {"train.bin", "validation.bin", "meta.json"} <= names
    assert not [n for n in names if "-of-" in n and n.endswith(".bin")]
    meta = json.loads((d / "data" / "meta.json").read_text())
    assert "num_shards" not in meta["key"]["args"]  # an existing store stays "up to date"
    assert run_prepare(d, inputs, num_shards=1)["status"] == "up to date"


def test_verify_finds_a_damaged_shard(reference):
    d, _ = reference
    path = d / "data" / "train-00002-of-00004.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    assert "shard 2" in error_line(invoke("prepare", d, "--verify"))


def test_bad_shard_options(bpe_dir, inputs):
    args = ("prepare", bpe_dir, *inputs)
    assert "--shard-index 4 is not in 0 .. 3" in error_line(invoke(*args, "--num-shards", 4, "--shard-index", 4))
    assert "--num-shards" in invoke(*args, "--num-shards", 0).output
    assert "--executor must be local or ray, got 'spark'" in error_line(invoke(*args, "--executor", "spark"))
    assert "not --dataset" in error_line(invoke("prepare", bpe_dir, "--dataset", "json", "--data-files",
                                                inputs[2], "--num-shards", 2))
    assert "no prepared data" in error_line(invoke("prepare", bpe_dir, "--verify"))


# -- many processes, resumes -----------------------------------------------------------------

def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "mlmtool", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.slow
def test_two_concurrent_processes_then_a_finishing_call(reference, bpe_dir, inputs):
    _, fp = reference
    d = model_copy(bpe_dir, "concurrent")
    common = ("prepare", d, *inputs, "--max-seq-length", 16, "--num-shards", N, "--json", "--num-proc", 1)
    procs = [_cli(*common, "--shard-index", 0, "--shard-index", 1),
             _cli(*common, env={"MLMTOOL_NUM_PROCESSES": "2", "MLMTOOL_PROCESS_ID": "1"})]  # takes 1 and 3
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o[0]) for o in outs]
    assert results[1].get("shards_here", [1, 3]) == [1, 3]
    # shard 1 is built once: by whichever came first; the other skips it
    last = run_prepare(d, inputs)  # the finishing call: nothing left to tokenize
    assert last["status"] in ("written", "up to date")
    assert fingerprint(d) == fp


@pytest.mark.slow
def test_killed_prepare_resumes_and_redoes_only_the_half_written_shard(reference, bpe_dir, inputs):
    _, fp = reference
    d = model_copy(bpe_dir, "killed")
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from mlmtool.data import shard_plan, shards
add = shards._Shard.add
def dying(self, out, line_by_line):
    r = add(self, out, line_by_line)
    if self.k == 2:
        for w in self.writers.values():
            w._file.flush()  # its files half-written on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return r
shards._Shard.add = dying
from mlmtool.data.corpus import open_corpus
from mlmtool.data.prepare import prepare
prepare({str(d)!r}, open_corpus({[str(p) for p in inputs]!r}), max_seq_length=16, num_shards={N},
        num_proc=1, show_progress=False, batch_bytes=2048)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    staging = shards.staging_dir(d / "data")
    assert not (d / "data").exists()  # nothing half-made is ever a store
    done = {k: (staging / shards.ledger_file(k, N)).stat().st_ino for k in (0, 1)}
    assert not (staging / shards.ledger_file(2, N)).exists()
    half = staging / ".train-00002-of-00004.bin.tmp"
    assert half.exists() and half.stat().st_size > 0
    # a shard file under its final name but with no ledger entry (killed between rename and ledger): redone
    (staging / "validation-00002-of-00004.bin").write_bytes(b"\xff" * 64)
    result = run_prepare(d, inputs, num_proc=1)
    assert result["status"] == "written"
    assert fingerprint(d) == fp
    assert {k: (d / "data" / shards.ledger_file(k, N)).stat().st_ino for k in (0, 1)} == done  # not redone
    assert not staging.exists() and not list((d / "data").glob(".*.tmp"))


def test_a_finished_store_is_up_to_date_for_a_shard_process(reference, inputs):
    d, fp = reference
    state = {p.name: p.stat().st_ino for p in (d / "data").iterdir()}
    assert run_prepare(d, inputs, shard_indices=[1])["status"] == "up to date"
    assert {p.name: p.stat().st_ino for p in (d / "data").iterdir()} == state
    assert fingerprint(d) == fp


# -- object storage --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on localhost (a real HTTP server), AWS_ENDPOINT_URL pointing at it; stopped after."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for var, value in (("AWS_ENDPOINT_URL", url), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_inputs_from_s3_give_the_same_store(reference, bpe_dir, inputs, s3_server):
    import boto3

    _, fp = reference
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="corpus")
    for p in inputs:
        s3.upload_file(str(p), "corpus", f"c/{p.name}")
    d = model_copy(bpe_dir, "s3")
    urls = [f"s3://corpus/c/{p.name}" for p in inputs]
    assert run_prepare(d, urls, num_proc=2)["status"] == "written"
    assert fingerprint(d) == fp
    assert run_prepare(d, ["s3://corpus/c/"])["status"] == "up to date"  # a prefix: the same files, sorted
    assert "does not exist" in error_line(invoke("prepare", d, "s3://corpus/nope.txt"))
    # the tokenizer's sample reads the same URLs
    r = invoke("tokenizer", d, "s3://corpus/c/", "--sample-bytes", 20000, "--vocab-size", 300, "--force", "--json")
    assert r.exit_code == 0, r.output


# -- Ray ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_executor_gives_the_same_store(reference, bpe_dir, inputs):
    ray = pytest.importorskip("ray")
    from mlmtool.data.ray_executor import worker_env

    _, fp = reference
    d = model_copy(bpe_dir, "ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", runtime_env={"env_vars": worker_env()})
    try:
        result = run_prepare(d, inputs, executor="ray")
    finally:
        ray.shutdown()
    assert result["status"] == "written"
    assert fingerprint(d) == fp


def test_ray_executor_without_ray_says_how_to_get_it(bpe_dir, inputs, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    line = error_line(invoke("prepare", bpe_dir, *inputs, "--num-shards", 2, "--executor", "ray"))
    assert "needs the ray package" in line and "pip install 'mlmtool[ray]'" in line
    assert not shards.staging_dir(bpe_dir / "data").exists()


# -- train reads a sharded store ---------------------------------------------------------------

READS_RUNNER = r"""
import json, os, sys
import numpy as np
import mlmtool.training.loader as loader

log = os.environ["MLMTOOL_TEST_READS"]
host_batch = loader.BatchLoader.host_batch

def logged(self, step):  # the train rows this process reads at each step
    read = self.store.read
    def reading(indices):
        import jax
        with open(f"{log}.{jax.process_index()}", "a") as f:
            f.write(json.dumps([step, np.asarray(indices).reshape(-1).tolist()]) + "\n")
        return read(indices)
    self.store.read = reading
    try:
        return host_batch(self, step)
    finally:
        del self.store.read

loader.BatchLoader.host_batch = logged
sys.argv = ["mlmtool", *sys.argv[1:]]
from mlmtool.cli import main
main()
"""


@pytest.mark.slow
def test_two_process_train_reads_only_its_rows_of_a_sharded_store(tmp_path):
    from mlmtool.training.loader import epoch_permutation
    from tests import test_distributed as dist
    from tests.pipeline import invoke as cli, prepared_dir

    d = prepared_dir(tmp_path)
    r = cli("prepare", d, tmp_path / "corpus.txt", "--max-seq-length", 32, "--validation-split-percentage", 10,
            "--num-shards", 3, "--force")
    assert r.exit_code == 0, r.output
    n = len(BlockStore.open(d / "data", "train"))
    assert len(json.loads((d / "data" / "meta.json").read_text())["shards"]) == 3
    log = tmp_path / "reads"
    port = dist._free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-c", READS_RUNNER, "train", str(d), *map(str, dist.TRAIN), "--seed", "7",
               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dist._env(2, tmp_path / "cache", MLMTOOL_TEST_READS=log,
                                                                    PYTHONPATH=ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reads = [{s: idx for s, idx in map(json.loads, Path(f"{log}.{i}").read_text().splitlines())} for i in range(2)]
    global_batch = 16
    steps_per_epoch = n // global_batch
    assert sorted(reads[0]) == sorted(reads[1]) == list(range(dist.STEPS))
    for step in range(dist.STEPS):
        a, b = reads[0][step], reads[1][step]
        assert len(a) == len(b) == global_batch // 2 and not set(a) & set(b)  # each its own half
        epoch, pos = divmod(step, steps_per_epoch)
        want = epoch_permutation(n, 7, epoch)[pos * global_batch:(pos + 1) * global_batch]
        assert sorted(a + b) == sorted(want.tolist())  # together: the step's global batch


# -- a resumed run on a sharded store ------------------------------------------------------------

@pytest.mark.slow
def test_resumed_train_on_a_sharded_store_is_bit_identical(tmp_path):
    """prepare --num-shards 4, then a run stopped in its first epoch and resumed into its second
    ends with the weights of the uninterrupted run (the loader's positions across the shard
    files and the epoch's permutation are restored, not re-derived from the stop)."""
    from mlmtool.hf_weights import read_safetensors
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.train import Trainer
    from mlmtool.training.train_config import TrainConfig
    from tests.pipeline import invoke as cli, prepared_dir

    d = prepared_dir(tmp_path, n_docs=120)
    r = cli("prepare", d, tmp_path / "corpus.txt", "--max-seq-length", 32, "--validation-split-percentage", 10,
            "--num-shards", N, "--force")
    assert r.exit_code == 0, r.output
    meta = json.loads((d / "data" / "meta.json").read_text())
    assert len(meta["shards"]) == N and all(sh["num_blocks"]["train"] > 0 for sh in meta["shards"])
    steps_per_epoch = len(BlockStore.open(d / "data", "train")) // 8
    assert 3 <= steps_per_epoch <= 40, steps_per_epoch
    cfg = TrainConfig(per_device_train_batch_size=8, max_steps=steps_per_epoch + 3, learning_rate=1e-3,
                      warmup_steps=2, logging_steps=2, save_steps=2, save_total_limit=2)

    def copy(name: str) -> Path:
        return Path(shutil.copytree(d, tmp_path / name))

    a, b = copy("a"), copy("b")
    Trainer(ModelDir(a), cfg).run(say=lambda *x: None)
    calls = iter(range(10_000))
    stop_at = steps_per_epoch - 2  # stops (and saves) in the first epoch
    out = Trainer(ModelDir(b), cfg).run(say=lambda *x: None, stop_requested=lambda: next(calls) == stop_at)
    assert out["stopped_early"] and out["final_step"] == stop_at + 1 < steps_per_epoch
    out = Trainer(ModelDir(b), cfg).run(say=lambda *x: None)
    assert out["start_step"] == stop_at + 1 and out["final_step"] == steps_per_epoch + 3
    pa, pb = read_safetensors(a / "model.safetensors"), read_safetensors(b / "model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
