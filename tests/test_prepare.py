"""``mlmtool prepare``: the block store holds exactly the documents' concatenated token stream."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mlmtool.data.blocks import BlockStore, read_meta
from mlmtool.cli import app
from mlmtool.data.corpus import open_corpus
from mlmtool.errors import DataError
from mlmtool.data.blocks import validation_mask
from mlmtool.data.prepare import prepare
from tests.pipeline import error_line
from tests.conftest import CORPUS_WORDS, TRICKY_WORDS, make_documents, make_model_dir, write_documents


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def reference(model_dir: Path, docs: list[str], seq_len: int, pct: float,
              line_by_line: bool = False) -> dict[str, np.ndarray]:
    """The blocks prepare must write, computed the obvious way, document by document."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.encode_special_tokens = True  # corpus text is text: "<mask>" in a document is no special id
    pad = tok.token_to_id("<pad>")
    pad = tok.token_to_id("[PAD]") if pad is None else pad
    docs = [d for d in docs if d.strip()]
    p = Fraction(str(pct))
    splits: dict[str, list[list[int]]] = {"train": [], "validation": []}
    for i, doc in enumerate(docs):
        val = math.floor((i + 1) * p / 100) > math.floor(i * p / 100)
        splits["validation" if val else "train"].append(tok.encode(doc).ids)
    out = {}
    for split, seqs in splits.items():
        if line_by_line:
            rows = [s if len(s) <= seq_len else s[:seq_len - 1] + s[-1:] for s in seqs]
            out[split] = np.array([r + [pad] * (seq_len - len(r)) for r in rows],
                                  dtype=np.int64).reshape(-1, seq_len)
        else:
            flat = [t for s in seqs for t in s]
            n = len(flat) // seq_len
            out[split] = np.array(flat[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return out


def stored(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "validation"):
        s = BlockStore.open(model_dir / "data", split)
        out[split] = s.read_range(0, len(s))
    return out


def data_files_state(model_dir: Path):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (model_dir / "data").iterdir()}


def no_leftovers(model_dir: Path) -> bool:
    return not [p for p in model_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# -- the stream is exact ---------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,pct", [(16, 5.0), (32, 10.0), (7, 0.0), (64, 33.3)])
def test_blocks_equal_reference_stream(bpe_dir, tmp_path, corpus_docs, seq_len, pct):
    docs = corpus_docs[:150] + ["", "   "] + corpus_docs[150:]
    corpus = write_documents(tmp_path / "c.txt", docs)
    result = prepare(bpe_dir, open_corpus([corpus]), max_seq_length=seq_len,
                     validation_split_percentage=pct, num_proc=1, show_progress=False,
                     batch_bytes=1024)
    want = reference(bpe_dir, docs, seq_len, pct)
    got = stored(bpe_dir)
    for split in ("train", "validation"):
        assert np.array_equal(got[split], want[split]), split
    meta = read_meta(bpe_dir / "data")
    n_val = math.floor(300 * Fraction(str(pct)) / 100)
    assert meta["documents"] == {"train": 300 - n_val, "validation": n_val}
    assert result["documents"] == 300 and result["status"] == "written"
    assert meta["tokens"]["train"] == meta["num_blocks"]["train"] * seq_len + meta["dropped_tokens"]["train"]
    assert meta["dropped_tokens"]["train"] < seq_len


def test_document_boundaries_and_dropped_remainder(bpe_dir, tmp_path):
    docs = ["the garden", "a letter", "very elegant"]
    corpus = write_documents(tmp_path / "c.txt", docs)
    prepare(bpe_dir, open_corpus([corpus]), max_seq_length=4, validation_split_percentage=0,
            num_proc=1, show_progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    stream = [t for d in docs for t in tok.encode(d).ids]
    assert stream[0] == 0 and stream[-1] == 2
    assert sum(1 for a, b in zip(stream, stream[1:]) if (a, b) == (2, 0)) == 2  # </s><s> between docs
    flat = stored(bpe_dir)["train"].reshape(-1).tolist()
    assert flat == stream[:len(stream) // 4 * 4]
    meta = read_meta(bpe_dir / "data")
    assert meta["dropped_tokens"]["train"] == len(stream) % 4
    assert meta["num_blocks"] == {"train": len(stream) // 4, "validation": 0}


# in a corpus file: no NUL (a binary file) and no line-final \r (stripped as a CRLF line end)
_file_words = st.sampled_from(CORPUS_WORDS + [t for t in TRICKY_WORDS if t not in ("\x00", "\r")])
_doc = st.lists(_file_words, min_size=0, max_size=60).map(" ".join)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(_doc, min_size=1, max_size=40), seq_len=st.integers(2, 40),
       pct=st.sampled_from([0.0, 5.0, 12.5, 50.0, 99.0]), line_by_line=st.booleans(),
       batch_bytes=st.sampled_from([50, 300, 1 << 20]))
def test_property_matches_reference(bpe_dir, tmp_path_factory, docs, seq_len, pct, line_by_line, batch_bytes):
    corpus = write_documents(tmp_path_factory.mktemp("c") / "c.txt", docs)
    want = reference(bpe_dir, docs, seq_len, pct, line_by_line)
    kwargs = dict(max_seq_length=seq_len, validation_split_percentage=pct, line_by_line=line_by_line,
                  num_proc=1, show_progress=False, batch_bytes=batch_bytes, force=True)
    if not any(d.strip() for d in docs):
        with pytest.raises(DataError, match="no documents"):
            prepare(bpe_dir, open_corpus([corpus]), **kwargs)
        return
    if len(want["train"]) == 0 or (pct > 0 and len(want["validation"]) == 0):
        with pytest.raises(DataError, match="too small|holds no block"):
            prepare(bpe_dir, open_corpus([corpus]), **kwargs)
        return
    prepare(bpe_dir, open_corpus([corpus]), **kwargs)
    got = stored(bpe_dir)
    for split in ("train", "validation"):
        assert np.array_equal(got[split], want[split]), split


_RUN_PREPARE = """
import hashlib, json, sys
import mlmtool.data.encode_pool as pool
import mlmtool.data.prepare as prep
from mlmtool.data.blocks import read_meta
from mlmtool.data.corpus import open_corpus
model_dir, corpus, num_proc, batch_bytes, fork = sys.argv[1:]
if fork == "0":  # the threaded fallback used where forking is unsafe (JAX imported)
    pool.fork_is_safe = lambda: False
prep.prepare(model_dir, open_corpus([corpus]), max_seq_length=32, num_proc=int(num_proc),
             force=True, show_progress=False, batch_bytes=int(batch_bytes))
meta = read_meta(model_dir + "/data")
files = {s: hashlib.sha256(open(f"{model_dir}/data/{s}.bin", "rb").read()).hexdigest()
         for s in ("train", "validation")}
skip = ("created", "seconds", "num_proc", "parallelism")
print(json.dumps({"files": files, "meta": {k: v for k, v in meta.items() if k not in skip},
                  "parallelism": meta["parallelism"]}))
"""


@pytest.mark.slow
def test_independent_of_num_proc_and_batch_size(bpe_dir, tmp_path):
    # In a fresh interpreter: forking worker processes is only done without JAX loaded,
    # and other tests in this process may have imported it.
    docs = make_documents(1500, seed=5, max_words=120)
    corpus = write_documents(tmp_path / "c.txt", docs)
    outputs = []
    for num_proc, batch_bytes, fork in ((1, 1 << 20, 1), (2, 2048, 1), (3, 777, 1), (2, 4096, 0)):
        out = subprocess.run([sys.executable, "-c", _RUN_PREPARE, str(bpe_dir), str(corpus),
                              str(num_proc), str(batch_bytes), str(fork)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result.pop("parallelism") == ("single process" if num_proc == 1 else
                                             f"{num_proc} processes" if fork else "tokenizers threads")
        outputs.append(result)
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]
    want = reference(bpe_dir, docs, 32, 5.0)
    assert np.array_equal(stored(bpe_dir)["train"], want["train"])


def test_line_by_line(bpe_dir, tmp_path, corpus_docs):
    docs = corpus_docs[:100] + ["short", " ".join(["garden"] * 200)]
    corpus = write_documents(tmp_path / "c.txt", docs)
    r = invoke("prepare", bpe_dir, corpus, "--line-by-line", "--max-seq-length", 24,
               "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    got = stored(bpe_dir)
    want = reference(bpe_dir, docs, 24, 10.0, line_by_line=True)
    assert np.array_equal(got["train"], want["train"])
    assert np.array_equal(got["validation"], want["validation"])
    meta = read_meta(bpe_dir / "data")
    assert meta["line_by_line"] is True
    assert meta["num_blocks"] == {"train": 92, "validation": 10}  # one block per document
    rows = np.concatenate([got["train"], got["validation"]])
    assert (rows[:, 0] == 0).all()
    for row in rows:  # each row: <s> ... </s> then padding
        n = int((row != 1).sum())
        assert row[n - 1] == 2 and (row[n:] == 1).all()
    assert meta["dropped_tokens"]["train"] > 0  # the long document was truncated


def test_wordpiece_blocks(wordpiece_dir, tmp_path, corpus_docs):
    corpus = write_documents(tmp_path / "c.txt", corpus_docs)
    prepare(wordpiece_dir, open_corpus([corpus]), max_seq_length=32, num_proc=2, show_progress=False)
    want = reference(wordpiece_dir, corpus_docs, 32, 5.0)
    got = stored(wordpiece_dir)
    assert np.array_equal(got["train"], want["train"])
    meta = read_meta(wordpiece_dir / "data")
    assert (meta["pad_token_id"], meta["cls_token_id"], meta["sep_token_id"], meta["mask_token_id"]) == (0, 2, 3, 4)
    assert meta["bos_token_id"] is None and meta["special_token_ids"] == [0, 1, 2, 3, 4]
    assert got["train"][0, 0] == 2


def test_prepare_same_with_and_without_piece_cache(bpe_dir, tmp_path, corpus_docs):
    corpus = write_documents(tmp_path / "c.txt", corpus_docs)
    files = []
    for cache in (True, False):
        prepare(bpe_dir, open_corpus([corpus]), max_seq_length=32, num_proc=1, force=True,
                show_progress=False, piece_cache=cache)
        files.append([(bpe_dir / "data" / f"{s}.bin").read_bytes() for s in ("train", "validation")])
    assert files[0] == files[1]


def test_no_piece_cache_option_reaches_the_encoder(bpe_dir, corpus_file, monkeypatch):
    """prepare --no-piece-cache: the workers encode with plain encode_batch, into the same blocks."""
    import mlmtool.data.encode_pool as pool

    jobs, init = [], pool._init_worker
    monkeypatch.setattr(pool, "_init_worker", lambda job, *a, **k: (jobs.append(job), init(job, *a, **k))[1])
    files = []
    for flag in ("--piece-cache", "--no-piece-cache"):
        r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32, "--num-proc", 1, "--force", flag)
        assert r.exit_code == 0, r.output
        files.append([(bpe_dir / "data" / f"{s}.bin").read_bytes() for s in ("train", "validation")])
    assert [j.piece_cache for j in jobs] == [True, False]
    assert files[0] == files[1]


# -- validation split rule -------------------------------------------------------------------

def is_validation(index: int, percentage: float) -> bool:
    """The rule for one document, in scalar integer arithmetic: the reference for validation_mask."""
    q = int(round(float(percentage) * 1_000_000 / 100))
    return ((index + 1) * q) // 1_000_000 > (index * q) // 1_000_000


@pytest.mark.parametrize("pct", [0, 0.5, 1, 5, 10, 12.5, 33.3, 50, 99.9])
def test_validation_rule_exact_and_streaming(pct):
    n = 20000
    mask = validation_mask(0, n, pct)
    assert mask.sum() == math.floor(n * Fraction(str(pct)) / 100)
    # chunked evaluation gives the same mask (it only depends on the document index)
    chunks = np.concatenate([validation_mask(s, min(777, n - s), pct) for s in range(0, n, 777)])
    assert np.array_equal(mask, chunks)
    assert [is_validation(i, pct) for i in range(300)] == mask[:300].tolist()
    # every prefix holds floor(k p / 100) validation documents: evenly spread
    k = np.arange(1, n + 1)
    assert np.array_equal(np.cumsum(mask), (k * int(round(pct * 10000))) // 1_000_000)
    if pct == 5:
        assert np.flatnonzero(mask)[:3].tolist() == [19, 39, 59]


# -- up to date, force, manifest -------------------------------------------------------------

def test_up_to_date_and_force(bpe_dir, corpus_file):
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32)
    assert r.exit_code == 0, r.output
    assert "MB/s" in r.output and "train" in r.output and "validation" in r.output
    state = data_files_state(bpe_dir)
    meta = read_meta(bpe_dir / "data")
    manifest = json.loads((bpe_dir / "manifest.json").read_text())
    assert manifest["prepare"]["args"]["max_seq_length"] == 32
    assert manifest["prepare"]["outputs"]["num_blocks"] == meta["num_blocks"]

    start = time.perf_counter()
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32, "--num-proc", 1)
    assert time.perf_counter() - start < 1.0
    assert r.exit_code == 0 and "up to date" in r.output.lower(), r.output
    assert data_files_state(bpe_dir) == state  # nothing rewritten

    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32, "--force")
    assert r.exit_code == 0 and "up to date" not in r.output.lower()
    assert data_files_state(bpe_dir) != state

    # other arguments, a touched input or a new tokenizer: redone
    for args in (("--max-seq-length", 16), ("--max-seq-length", 16, "--line-by-line"),
                 ("--max-seq-length", 16, "--line-by-line", "--validation-split-percentage", 10)):
        r = invoke("prepare", bpe_dir, corpus_file, *args)
        assert r.exit_code == 0 and "up to date" not in r.output.lower(), args
    st_ = corpus_file.stat()
    os.utime(corpus_file, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 16, "--line-by-line",
               "--validation-split-percentage", 10)
    assert r.exit_code == 0 and "up to date" not in r.output.lower()
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 16, "--line-by-line",
               "--validation-split-percentage", 10)
    assert "up to date" in r.output.lower()
    assert invoke("tokenizer", bpe_dir, corpus_file, "--vocab-size", 300).exit_code == 0
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 16, "--line-by-line",
               "--validation-split-percentage", 10)
    assert r.exit_code == 0 and "up to date" not in r.output.lower()
    assert read_meta(bpe_dir / "data")["vocab_size"] == 300


def test_json_output(bpe_dir, corpus_file):
    r = invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32, "--json", "--num-proc", 1)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    meta = read_meta(bpe_dir / "data")
    assert result["status"] == "written" and result["num_blocks"] == meta["num_blocks"]
    assert result["documents"] == 300 and result["tokens"] == sum(meta["tokens"].values())
    assert result["parallelism"] == "single process" and result["mb_per_s"] > 0
    again = json.loads(invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32, "--json").stdout)
    assert again["status"] == "up to date" and again["num_blocks"] == meta["num_blocks"]


@pytest.mark.slow
def test_up_to_date_path_imports_neither_transformers_nor_jax(bpe_dir, corpus_file):
    assert invoke("prepare", bpe_dir, corpus_file).exit_code == 0
    code = f"""
import sys, time
t = time.perf_counter()
from typer.testing import CliRunner
from mlmtool.cli import app
r = CliRunner().invoke(app, ["prepare", {str(bpe_dir)!r}, {str(corpus_file)!r}])
assert r.exit_code == 0 and "up to date" in r.output.lower(), r.output
heavy = [m for m in ("transformers", "jax", "torch", "datasets") if m in sys.modules]
assert not heavy, heavy
print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    # imports included; generous for a loaded CI machine (typically ~0.4 s)
    assert float(out.stdout.strip().splitlines()[-1]) < 2.5


def test_interrupted_prepare_keeps_previous_data(bpe_dir, corpus_file, monkeypatch):
    assert invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 32).exit_code == 0
    before = {p.name: p.read_bytes() for p in (bpe_dir / "data").iterdir()}
    from mlmtool.data import blocks

    calls = []

    def boom(self, tokens, lengths=None):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(blocks.SplitWriter, "add_stream", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(bpe_dir, open_corpus([corpus_file]), max_seq_length=16, num_proc=2, force=True,
                show_progress=False, batch_bytes=512)
    assert {p.name: p.read_bytes() for p in (bpe_dir / "data").iterdir()} == before
    assert no_leftovers(bpe_dir)


# -- errors ----------------------------------------------------------------------------------

def test_needs_tokenizer_and_config(tmp_path, corpus_file):
    d = make_model_dir(tmp_path / "m", "tiny")
    assert error_line(invoke("prepare", d, corpus_file)) == (
        f"error: no tokenizer in {d}: run 'mlmtool tokenizer {d} FILE...' first")
    (tmp_path / "empty").mkdir()
    assert "run 'mlmtool init" in error_line(invoke("prepare", tmp_path / "empty", corpus_file))


def test_max_seq_length_limit(bpe_dir, corpus_file):
    line = error_line(invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 513))
    assert "--max-seq-length 513 exceeds the model's limit of 512" in line
    assert invoke("prepare", bpe_dir, corpus_file, "--max-seq-length", 512,
                  "--validation-split-percentage", 0).exit_code == 0


@pytest.mark.parametrize("docs,args,message", [
    (["a short one", "and another"], ("--max-seq-length", 128), "the corpus is too small"),
    (["the garden is very elegant"] * 10, ("--max-seq-length", 8),
     r"the validation split \(5% of 10 documents = 0 documents"),
    (["the garden"] * 50, ("--validation-split-percentage", 100), "must be in \\[0, 100\\)"),
    (["\t", " "], (), "no documents"),
])
def test_data_errors_leave_nothing(bpe_dir, tmp_path, docs, args, message):
    import re

    corpus = write_documents(tmp_path / "c.txt", docs)
    line = error_line(invoke("prepare", bpe_dir, corpus, *args))
    assert re.search(message, line), line
    assert not (bpe_dir / "data").exists()
    assert no_leftovers(bpe_dir)


def test_config_must_agree_with_tokenizer(bpe_dir, corpus_file):
    config = json.loads((bpe_dir / "config.json").read_text())
    (bpe_dir / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 8}))
    line = error_line(invoke("prepare", bpe_dir, corpus_file))
    assert "config.json's vocab_size" in line and "mlmtool tokenizer" in line
    # a larger vocab_size is a padded embedding matrix (issue 21, class 3): accepted, and recorded
    (bpe_dir / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    r = invoke("prepare", bpe_dir, corpus_file, "--force")
    assert r.exit_code == 0, r.output
    meta = json.loads((bpe_dir / "data" / "meta.json").read_text())
    assert (meta["vocab_size"], meta["model_vocab_size"]) == (config["vocab_size"], config["vocab_size"] + 8)
    (bpe_dir / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    assert "pad_token_id 0 differs from the tokenizer's 1" in error_line(invoke("prepare", bpe_dir, corpus_file))


def test_refuses_a_directory_in_use(bpe_dir, corpus_file):
    import socket

    from mlmtool.modeldir import ModelDir

    lock = bpe_dir / ".mlmtool.runtime.lock"
    with ModelDir(bpe_dir).lock("train"):  # held, as by a running 'mlmtool train'
        line = error_line(invoke("prepare", bpe_dir, corpus_file))
    assert "in use by 'mlmtool train'" in line
    assert not (bpe_dir / "data").exists()
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "command": "train"}))
    assert invoke("prepare", bpe_dir, corpus_file).exit_code == 0  # a stale lock is taken over
    assert not lock.exists()


def test_input_errors(bpe_dir, tmp_path):
    assert "no corpus given" in error_line(invoke("prepare", bpe_dir))
    assert "no files match" in error_line(invoke("prepare", bpe_dir, str(tmp_path / "*.txt")))
    (tmp_path / "x.bin.txt").write_bytes(b"\0\1\2" * 100)
    assert "looks binary" in error_line(invoke("prepare", bpe_dir, tmp_path / "x.bin.txt"))
    j = tmp_path / "a.jsonl"
    j.write_text('{"body": "x"}\n')
    assert "has no column 'text' (its columns: 'body')" in error_line(invoke("prepare", bpe_dir, j))
    assert not (bpe_dir / "data").exists()


# -- input formats ----------------------------------------------------------------------------

def test_formats_give_the_same_blocks(bpe_dir, tmp_path, corpus_docs):
    docs = corpus_docs[:200]
    txt = write_documents(tmp_path / "c.txt", docs)
    assert invoke("prepare", bpe_dir, txt, "--max-seq-length", 32).exit_code == 0
    want = stored(bpe_dir)

    inputs = {}
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": 1, "content": d}) + "\n")
    inputs["jsonl"] = [tmp_path / "c.jsonl", "--text-column", "content"]
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["content"])
        w.writerows([d] for d in docs)
    inputs["csv"] = [tmp_path / "c.csv", "--text-column", "content"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": docs}), tmp_path / "c.parquet")
    inputs["parquet"] = [tmp_path / "c.parquet", "--text-column", "content"]
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(d + "\n" for d in docs))
    inputs["gz"] = [tmp_path / "c.txt.gz"]
    parts = tmp_path / "parts"
    write_documents(parts / "00.txt", docs[:120])
    write_documents(parts / "sub" / "01.txt", docs[120:])
    inputs["directory"] = [parts]
    inputs["glob"] = [str(parts / "**" / "*.txt")]
    for name, args in inputs.items():
        r = invoke("prepare", bpe_dir, *args, "--max-seq-length", 32)
        assert r.exit_code == 0, (name, r.output)
        got = stored(bpe_dir)
        assert np.array_equal(got["train"], want["train"]), name
        assert np.array_equal(got["validation"], want["validation"]), name


# -- the whole pipeline through the CLI -------------------------------------------------------

@pytest.mark.slow
def test_cli_pipeline_init_tokenizer_prepare(tmp_path, corpus_file):
    d = tmp_path / "model"
    r = invoke("init", d, "--preset", "tiny", "--set", "vocab_size=400")
    assert r.exit_code == 0, r.output
    r = invoke("tokenizer", d, corpus_file)
    assert r.exit_code == 0, r.output
    r = invoke("prepare", d, corpus_file, "--max-seq-length", 64, "--num-proc", 2)
    assert r.exit_code == 0, r.output
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "data/meta.json", "data/train.bin", "data/validation.bin", "manifest.json"):
        assert (d / name).is_file(), name
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    meta = read_meta(d / "data")
    assert config.vocab_size == len(tok) == meta["vocab_size"]
    assert meta["pad_token_id"] == tok.pad_token_id == config.pad_token_id
    assert meta["mask_token_id"] == tok.mask_token_id
    assert meta["special_token_ids"] == sorted(tok.all_special_ids)
    train = BlockStore.open(d / "data", "train")
    assert train.seq_len == 64 and len(train) == meta["num_blocks"]["train"] > 0
    assert train.read(np.array([0])).max() < config.vocab_size
    assert set(json.loads((d / "manifest.json").read_text())) >= {"init", "tokenizer", "prepare"}


# -- document starts are recorded, not read off the ids ----------------------------------------

@pytest.mark.parametrize("num_shards,piece_cache", [(1, True), (2, False)])
def test_prepare_records_document_starts_whatever_the_text(bpe_dir, tmp_path, corpus_docs, num_shards, piece_cache):
    """Documents whose text holds "<s>", "[CLS]" and "</s>": the block store records where each
    document starts, and the batches' segment ids (--document-attention) follow the record."""
    import jax
    from tokenizers import Tokenizer

    from mlmtool.runtime import sharding as sh
    from mlmtool.training.loader import BatchLoader
    from mlmtool.models.layers import document_segments

    docs = [f"{d} <s> and [CLS] then </s>" if i % 3 == 0 else d for i, d in enumerate(corpus_docs[:120])]
    corpus = write_documents(tmp_path / "c.txt", docs)
    prepare(bpe_dir, open_corpus([corpus]), max_seq_length=16, validation_split_percentage=0, num_proc=1,
            show_progress=False, batch_bytes=2048, num_shards=num_shards, piece_cache=piece_cache)
    assert read_meta(bpe_dir / "data")["document_starts"] is True
    store = BlockStore.open(bpe_dir / "data", "train")
    assert store.has_starts
    ids, starts = store.read_documents(np.arange(len(store)))
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    if num_shards == 1:  # one stream: the starts are the documents' offsets in it
        lengths = np.asarray([len(tok.encode(d).ids) for d in docs])
        want = np.zeros(lengths.sum(), bool)
        want[np.cumsum(lengths) - lengths] = True
        assert np.array_equal(starts.reshape(-1), want[:starts.size])
    cls = store.meta["cls_token_id"]
    # every document starts once (but where a shard's dropped remainder held it), at its <s>
    assert len(docs) - 2 * num_shards <= starts.sum() <= len(docs) and np.all(ids[starts] == cls)
    # the literal "<s>" is text (issue 21 class 4), so the cls id appears nowhere else here
    assert np.array_equal(ids == cls, starts)
    # The loader's batches carry the record, and the segment ids step from it.
    mesh = sh.make_mesh(None, devices=jax.devices()[:1])
    loader = BatchLoader(store, accum=1, micro_batch=4, seed=0, steps_per_epoch=len(store) // 4,
                         sharding=sh.batch_sharding(mesh, leading_dims=1), start=0, stop=2, documents=True)
    try:
        for _, (batch_ids, batch_starts) in loader:
            seg = np.asarray(document_segments(batch_starts[0], batch_ids[0], store.pad_token_id))
            b_starts = np.asarray(batch_starts[0])
            assert np.array_equal(np.diff(seg, axis=1) == 1, b_starts[:, 1:])
            assert np.array_equal(seg[:, 0], 1 + b_starts[:, 0])
    finally:
        loader.close()


def test_line_by_line_records_no_starts(bpe_dir, tmp_path, corpus_docs):
    corpus = write_documents(tmp_path / "c.txt", corpus_docs[:50])
    prepare(bpe_dir, open_corpus([corpus]), max_seq_length=16, line_by_line=True, validation_split_percentage=0,
            num_proc=1, show_progress=False)
    assert read_meta(bpe_dir / "data")["document_starts"] is False
    assert not list((bpe_dir / "data").glob("*.starts.bin"))
