"""Reading a corpus: the per-format readers (text, JSON, CSV, parquet, datasets), compressed
streams, batching, and what a pass counts (mlmtool.data.corpus.readers and .streams)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import subprocess
import sys

import pytest

from mlmtool.data.corpus import DataError, open_corpus
from tests.conftest import make_documents, read_all, write_documents


# -- plain text -----------------------------------------------------------------------------

def test_txt_skips_blank_lines_and_strips_newlines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"\xef\xbb\xbffirst doc\n\n   \n\t\nsecond doc  \r\nthird\r\n  indented\nlast no newline")
    corpus = open_corpus([p])
    assert read_all(corpus) == ["first doc", "second doc  ", "third", "  indented", "last no newline"]
    assert corpus.stats.documents == 5
    assert corpus.stats.bytes == p.stat().st_size
    assert corpus.unit == "bytes" and corpus.total == p.stat().st_size


@pytest.mark.parametrize("batch_bytes", [7, 64, 1 << 20])
def test_batches_are_bounded_and_complete(tmp_path, batch_bytes):
    docs = make_documents(200, seed=1)
    docs.insert(50, "x" * 5000)  # a line longer than the batch
    p = write_documents(tmp_path / "a.txt", docs)
    corpus = open_corpus([p])
    batches = list(corpus.batches(batch_bytes=batch_bytes))
    assert [d for b in batches for d in b.documents] == docs
    assert sum(b.progress for b in batches) == p.stat().st_size
    if batch_bytes < 1000:
        assert len(batches) > 10
        # no batch holds much more than batch_bytes (plus at most one line)
        assert max(sum(len(d) + 1 for d in b.documents) for b in batches) <= batch_bytes + 5001


@pytest.mark.parametrize("suffix,opener", [
    (".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open), (".zst", None)])
def test_compressed_text(tmp_path, suffix, opener):
    docs = make_documents(100, seed=2)
    data = "".join(d + "\n" for d in docs).encode()
    p = tmp_path / f"a.txt{suffix}"
    if opener is None:
        zstd = pytest.importorskip("zstandard")
        p.write_bytes(zstd.ZstdCompressor().compress(data))
    else:
        with opener(p, "wb") as f:
            f.write(data)
    corpus = open_corpus([p])
    batches = list(corpus.batches(batch_bytes=256))
    assert [d for b in batches for d in b.documents] == docs
    # progress is in on-disk (compressed) bytes and adds up to the known total
    assert sum(b.progress for b in batches) == p.stat().st_size == corpus.total
    assert corpus.stats.bytes == len(data)


def test_compressed_jsonl(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for d in ["one", "two"]:
            f.write(json.dumps({"text": d}) + "\n")
    assert read_all(open_corpus([p])) == ["one", "two"]


# -- structured formats ---------------------------------------------------------------------

def test_jsonl_text_column(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1, "body": "hello world"}\n\n{"id": 2, "body": "  "}\n'
                 '{"id": 3, "body": null}\n{"id": 4, "body": "second"}', encoding="utf-8")
    assert read_all(open_corpus([p], text_column="body")) == ["hello world", "second"]
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: 'id', 'body'\).*--text-column"):
        read_all(open_corpus([p]))


def test_jsonl_invalid_line_names_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl line 2 is not valid JSON"):
        read_all(open_corpus([p]))


def test_json_array_and_json_lines(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"text": "first"}, {"text": "second"}]), encoding="utf-8")
    b = tmp_path / "b.json"
    b.write_text('{"text": "third"}\n{"text": "fourth"}\n', encoding="utf-8")
    assert read_all(open_corpus([a, b])) == ["first", "second", "third", "fourth"]


def test_json_non_text_column(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match="holds int, not text"):
        read_all(open_corpus([p]))


def test_csv(tmp_path):
    p = tmp_path / "a.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "content"])
        w.writerow([1, 'multi\nline, "quoted" text'])
        w.writerow([2, ""])
        w.writerow([3, "plain"])
    assert read_all(open_corpus([p], text_column="content")) == ['multi\nline, "quoted" text', "plain"]
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: 'id', 'content'\)"):
        read_all(open_corpus([p]))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    docs = [f"document number {i}" for i in range(2500)] + [None, "   "]
    pq.write_table(pa.table({"n": list(range(len(docs))), "text": docs}), p, row_group_size=700)
    corpus = open_corpus([p])
    batches = list(corpus.batches())
    assert [d for b in batches for d in b.documents] == docs[:2500]
    assert sum(b.progress for b in batches) == p.stat().st_size
    with pytest.raises(DataError, match=r"no column 'body' \(its columns: 'n', 'text'\)"):
        read_all(open_corpus([p], text_column="body"))


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "beta"], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus([tmp_path / "ds"])
    assert [s.format for s in corpus.sources] == ["saved_dataset"]
    assert read_all(corpus) == ["alpha", "beta"]
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["gamma"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_all(open_corpus([tmp_path / "dd"], split="test")) == ["gamma"]
    with pytest.raises(DataError, match=r"no split 'validation' \(its splits: train, test\)"):
        read_all(open_corpus([tmp_path / "dd"], split="validation"))
    with pytest.raises(DataError, match=r"no column 'body'.*'text', 'label'"):
        read_all(open_corpus([tmp_path / "ds"], text_column="body"))


def test_hub_dataset_code_path(monkeypatch):
    """--dataset goes through datasets.load_dataset (faked here: no hub in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        ds = datasets.Dataset.from_dict({"text": ["hub doc one", " ", "hub doc two"], "id": [1, 2, 3]})
        return ds.to_iterable_dataset() if kwargs.get("streaming") else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for streaming in (False, True):
        corpus = open_corpus(dataset="oscar", dataset_config="unshuffled_deduplicated_ko",
                             split="train", streaming=streaming, revision="v1")
        assert corpus.unit == "documents" and corpus.total is None
        batches = list(corpus.batches(batch_documents=2))
        assert [d for b in batches for d in b.documents] == ["hub doc one", "hub doc two"]
        assert sum(b.progress for b in batches) == 3
    assert calls[0] == ("oscar", "unshuffled_deduplicated_ko",
                        {"split": "train", "streaming": False, "revision": "v1"})
    fp = corpus.fingerprint()
    assert {k: fp[k] for k in ("dataset", "config", "split", "revision")} == {
        "dataset": "oscar", "config": "unshuffled_deduplicated_ko", "split": "train", "revision": "v1"}
    with pytest.raises(DataError, match=r"no column 'body'"):
        read_all(open_corpus(dataset="oscar", text_column="body"))

    def failing(*a, **k):
        raise ConnectionError("Couldn't reach the hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"cannot load dataset 'oscar': Couldn't reach the hub: check the name"):
        read_all(open_corpus(dataset="oscar"))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \n\t\n \r\n"])
def test_empty_corpus(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    corpus = open_corpus([p])
    with pytest.raises(DataError, match=r"no documents: .*empty\.txt hold only empty or whitespace"):
        read_all(corpus)


def test_non_utf8_lines_skipped_and_counted(tmp_path):
    good = write_documents(tmp_path / "good.txt", ["fine", "also fine"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ok café\n".encode() + b"caf\xe9 latin-1\n" + b"\xff\xfe junk\n" + b"last\n")
    corpus = open_corpus([good, bad])
    assert read_all(corpus) == ["fine", "also fine", "ok café", "last"]
    assert corpus.stats.skipped_lines == {str(bad): 2}
    assert corpus.warnings() == [f"skipped 2 lines that are not valid UTF-8: {bad} (2)"]


def test_all_lines_undecodable(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\nna\xefve\n")
    with pytest.raises(DataError, match=r"2 lines were skipped as not valid UTF-8 \(.*latin1\.txt\).*iconv"):
        read_all(open_corpus([bad]))


@pytest.mark.slow
def test_no_jax_or_transformers_import():
    code = ("import sys, mlmtool.data.corpus, mlmtool.data.blocks, mlmtool.data.prepare, mlmtool.data.tokenizer_train;"
            "bad = [m for m in ('jax', 'transformers', 'torch', 'datasets') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
