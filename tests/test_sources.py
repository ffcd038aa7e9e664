"""Corpus sources through the CLI: compressed files, and datasets' builders (the --dataset code
path, --streaming included) on local files, so no hub is needed."""

from __future__ import annotations

import bz2
import gzip
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mlmtool.data.blocks import BlockStore
from tests.conftest import make_documents
from tests.pipeline import invoke

DOCS = make_documents(200, seed=3)


def _blocks(d: Path) -> dict[str, np.ndarray]:
    return {s: BlockStore.open(d / "data", s).read_range(0, len(BlockStore.open(d / "data", s)))
            for s in ("train", "validation")}


def _write(path: Path, kind: str, docs: list[str]) -> Path:
    text = "".join((json.dumps({"content": d, "n": i}) if "jsonl" in kind else d) + "\n"
                   for i, d in enumerate(docs)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind.endswith(".gz"):
        data = gzip.compress(text)
    elif kind.endswith(".zst"):
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(text)  # an optional dependency
    elif kind.endswith(".bz2"):
        data = bz2.compress(text)
    else:
        data = text
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tokenizer + prepare on the plain .txt corpus: (tokenizer.json text, blocks, an initialised DIR)."""
    root = tmp_path_factory.mktemp("sources")
    corpus = _write(root / "corpus.txt", "txt", DOCS)
    base = root / "base"
    assert invoke("init", base, "--preset", "tiny").exit_code == 0
    d = Path(shutil.copytree(base, root / "ref"))
    assert invoke("tokenizer", d, corpus, "--vocab-size", 400).exit_code == 0
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--num-proc", 1)
    assert r.exit_code == 0, r.output
    return (d / "tokenizer.json").read_text(), _blocks(d), base


@pytest.mark.parametrize("kind", ["txt.gz", "jsonl.gz", "txt.zst", "jsonl.zst", "jsonl.bz2"])
def test_compressed_inputs_give_the_same_tokenizer_and_blocks(reference, tmp_path, kind, monkeypatch):
    tokenizer_json, blocks, base = reference
    corpus = _write(tmp_path / f"corpus.{kind}", kind, DOCS)
    d = Path(shutil.copytree(base, tmp_path / "m"))
    monkeypatch.setenv("MLMTOOL_NUM_PROC", "1")
    if "jsonl" in kind:
        monkeypatch.setenv("MLMTOOL_TEXT_COLUMN", "content")  # = --text-column content
    r = invoke("tokenizer", d, corpus, "--vocab-size", 400, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["documents"] == len(DOCS)
    assert (d / "tokenizer.json").read_text() == tokenizer_json
    r = invoke("prepare", d, corpus, "--max-seq-length", 32, "--json")
    assert r.exit_code == 0, r.output
    got = _blocks(d)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(got[split], blocks[split], err_msg=split)


@pytest.mark.parametrize("streaming", [True, False])
def test_local_dataset_builder_through_tokenizer_and_prepare(reference, tmp_path, streaming, monkeypatch):
    """--dataset json --data-files ... [--streaming]: datasets.load_dataset on local shards,
    the hub code path without a hub; the same documents give the same blocks as the files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not the user's cache
    tokenizer_json, blocks, base = reference
    shards = tmp_path / "shards"
    _write(shards / "00.jsonl.gz", "jsonl.gz", DOCS[:120])
    _write(shards / "01.jsonl", "jsonl", DOCS[120:])
    d = Path(shutil.copytree(base, tmp_path / "m"))
    source = ["--dataset", "json", "--data-files", str(shards / "*.jsonl*"), "--text-column", "content",
              *(["--streaming"] if streaming else [])]
    r = invoke("tokenizer", d, *source, "--vocab-size", 400)
    assert r.exit_code == 0, r.output
    assert (d / "tokenizer.json").read_text() == tokenizer_json
    r = invoke("prepare", d, *source, "--max-seq-length", 32, "--num-proc", 1, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["documents"] == len(DOCS)
    got = _blocks(d)
    for split in ("train", "validation"):
        np.testing.assert_array_equal(got[split], blocks[split], err_msg=split)
    manifest = json.loads((d / "manifest.json").read_text())
    files = manifest["prepare"]["inputs"]["data_files"]
    assert [Path(f["path"]).name for f in files] == ["00.jsonl.gz", "01.jsonl"]

    if streaming:
        r = invoke("prepare", d, *source, "--max-seq-length", 32, "--json")
        assert json.loads(r.stdout)["status"] == "up to date"
        time.sleep(0.01)
        _write(shards / "01.jsonl", "jsonl", DOCS[120:150])  # a shard changed: prepare again
        r = invoke("prepare", d, *source, "--max-seq-length", 32, "--num-proc", 1, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["documents"] == 150


def test_text_builder_and_a_directory_of_data_files(tmp_path, monkeypatch):
    import datasets

    from mlmtool.data.corpus import open_corpus

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    _write(tmp_path / "t" / "a.txt", "txt", DOCS[:10] + ["", "   "])
    _write(tmp_path / "t" / "b.txt", "txt", DOCS[10:20])
    (tmp_path / "t" / ".hidden.txt").write_text("not me\n")
    for streaming in (True, False):
        corpus = open_corpus(dataset="text", data_files=[tmp_path / "t"], streaming=streaming)
        assert [doc for b in corpus.batches() for doc in b.documents] == DOCS[:20]
        assert corpus.describe() == "dataset text of 2 files, split train"


@pytest.mark.parametrize("args, message", [
    (("--data-files", "x.jsonl"), "--data-files needs --dataset"),
    (("--dataset", "json"), "--dataset json needs --data-files"),
    (("--dataset", "json", "--data-files", "nothing/*.jsonl"), "no such file"),
])
def test_dataset_option_errors(reference, args, message):
    _, _, base = reference
    r = invoke("tokenizer", base, *args)
    assert r.exit_code == 1 and message in r.stderr, r.output


def test_hub_dataset_keeps_repository_data_files(monkeypatch):
    """For a hub dataset, --data-files are paths inside its repository: passed on as given."""
    import datasets

    from mlmtool.data.corpus import open_corpus

    seen = {}

    def fake_load_dataset(name, config=None, **kwargs):
        seen.update(kwargs, name=name)
        return datasets.Dataset.from_dict({"text": ["one", "two"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = open_corpus(dataset="allenai/c4", data_files=["en/c4-train.0000*-of-01024.json.gz"], streaming=True)
    assert [doc for b in corpus.batches() for doc in b.documents] == ["one", "two"]
    assert seen["data_files"] == ["en/c4-train.0000*-of-01024.json.gz"] and seen["streaming"] is True
    assert corpus.fingerprint()["data_files"] == ["en/c4-train.0000*-of-01024.json.gz"]
