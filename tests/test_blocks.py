"""The block store: SplitWriter cuts a token stream into blocks; BlockStore reads them back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlmtool.data import blocks
from mlmtool.data.blocks import BlockStore, SplitWriter, dtype_for_vocab, read_meta
from mlmtool.errors import DataError


def write_store(tmp_path, splits: dict[str, np.ndarray], seq_len: int, dtype="uint16", **extra):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    np_dtype = np.dtype("<u2") if dtype == "uint16" else np.dtype("<u4")
    for split, arr in splits.items():
        (d / f"{split}.bin").write_bytes(np.asarray(arr, dtype=np_dtype).tobytes())
    meta = {"format": blocks.FORMAT, "version": blocks.VERSION, "dtype": dtype, "seq_len": seq_len,
            "num_blocks": {s: int(np.asarray(a).shape[0]) for s, a in splits.items()},
            "pad_token_id": 1, "mask_token_id": 4, "special_token_ids": [0, 1, 2, 3, 4],
            "vocab_size": 70000 if dtype == "uint32" else 500, **extra}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_dtype_for_vocab():
    assert dtype_for_vocab(8192) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 50), max_size=30), seq_len=st.integers(1, 17))
def test_split_writer_concatenates_and_drops_only_the_remainder(tmp_path_factory, lengths, seq_len):
    tmp = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(len(lengths) * 100 + seq_len)
    chunks = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in lengths]
    w = SplitWriter(tmp / "train.bin", seq_len, np.dtype("<u2"))
    for c in chunks:
        w.add_stream(c)
        assert w.remainder < seq_len
    w.close()
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.uint16)
    n = stream.size // seq_len
    assert w.num_blocks == n
    assert w.dropped_tokens == stream.size - n * seq_len
    on_disk = np.fromfile(tmp / "train.bin", dtype="<u2")
    assert np.array_equal(on_disk, stream[:n * seq_len])


def test_split_writer_blocks_and_uint32(tmp_path):
    w = SplitWriter(tmp_path / "v.bin", 4, np.dtype("<u4"))
    w.add_blocks(np.array([[70000, 1, 2, 3], [4, 5, 6, 7]]))
    with pytest.raises(ValueError):
        w.add_blocks(np.zeros((1, 3)))
    w.close()
    assert np.fromfile(tmp_path / "v.bin", "<u4").tolist() == [70000, 1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_block_store_reads(tmp_path, dtype):
    hi = 65535 if dtype == "uint16" else 69999
    train = np.arange(40 * 8).reshape(40, 8) % (hi + 1)
    train[0, 0] = hi
    d = write_store(tmp_path, {"train": train, "validation": train[:3]}, 8, dtype)
    store = BlockStore.open(d, "train")
    assert len(store) == store.num_blocks == 40
    assert store.seq_len == 8
    assert store.pad_token_id == 1 and store.mask_token_id == 4
    assert store.special_token_ids == (0, 1, 2, 3, 4)
    assert store.vocab_size in (500, 70000)
    idx = np.array([39, 0, 5, 5, 17])
    got = store.read(idx)
    assert got.dtype == np.int32 and got.shape == (5, 8)
    assert np.array_equal(got, train[idx])
    assert got[1, 0] == hi  # no sign trouble at the top of the range
    assert np.array_equal(store.read_range(10, 13), train[10:13])
    assert store.read_range(38, 45).shape == (2, 8)
    assert store.read([]).shape == (0, 8)
    with pytest.raises(IndexError):
        store.read([40])
    with pytest.raises(IndexError):
        store.read([-1])
    assert len(BlockStore.open(d, "validation")) == 3
    assert store.meta["num_blocks"] == {"train": 40, "validation": 3}


def test_empty_split(tmp_path):
    d = write_store(tmp_path, {"train": np.zeros((2, 4)), "validation": np.zeros((0, 4))}, 4)
    store = BlockStore.open(d, "validation")
    assert len(store) == 0
    assert store.read_range(0, 10).shape == (0, 4)


def test_open_errors(tmp_path):
    with pytest.raises(DataError, match="no prepared data .*run 'mlmtool prepare"):
        BlockStore.open(tmp_path, "train")
    d = write_store(tmp_path, {"train": np.zeros((3, 4)), "validation": np.zeros((1, 4))}, 4)
    with pytest.raises(DataError, match="no split 'test'"):
        BlockStore.open(d, "test")
    # damaged: file shorter than meta says
    (d / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"train\.bin is damaged: 10 bytes.*3 blocks of 4 uint16 \(24 bytes\).*--force"):
        BlockStore.open(d, "train")
    (d / "train.bin").unlink()
    with pytest.raises(DataError, match=r"train\.bin is missing"):
        BlockStore.open(d, "train")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        read_meta(d)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        BlockStore.open(d, "validation")
    (d / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not an mlmtool block store"):
        BlockStore.open(d, "validation")


# -- document starts, recorded beside the blocks --------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=30), seq_len=st.integers(1, 17),
       chunk=st.integers(1, 5))
def test_split_writer_records_where_documents_start(tmp_path_factory, lengths, seq_len, chunk):
    tmp = tmp_path_factory.mktemp("s")
    rng = np.random.default_rng(len(lengths) * 100 + seq_len)
    docs = [rng.integers(0, 500, size=n).astype(np.uint16) for n in lengths]
    w = SplitWriter(tmp / "train.bin", seq_len, np.dtype("<u2"), starts_path=tmp / "train.starts.bin")
    for i in range(0, len(docs), chunk):  # several documents per call, as prepare's batches come
        part = docs[i:i + chunk]
        w.add_stream(np.concatenate(part), [len(d) for d in part])
    w.close()
    n = sum(lengths) // seq_len
    want = np.zeros(sum(lengths), bool)
    want[np.cumsum(lengths, dtype=np.int64) - np.asarray(lengths, dtype=np.int64)] = True
    packed = np.fromfile(tmp / "train.starts.bin", np.uint8).reshape(n, blocks.starts_row_bytes(seq_len))
    assert np.array_equal(np.unpackbits(packed, axis=1, count=seq_len).reshape(-1), want[:n * seq_len])


def test_split_writer_refuses_lengths_that_do_not_add_up(tmp_path):
    w = SplitWriter(tmp_path / "t.bin", 4, np.dtype("<u2"), starts_path=tmp_path / "t.starts.bin")
    with pytest.raises(ValueError, match="lengths summing to 5 for 6 tokens"):
        w.add_stream(np.arange(6), [2, 3])
    with pytest.raises(ValueError):
        w.add_stream(np.arange(2), [2, 0])  # a document of no tokens: no start to record
    w.abort()


def _store_with_starts(tmp_path, seq_len=6):
    """Two documents laid end to end, the second with the cls id (0) inside its text."""
    d = tmp_path / "data"
    d.mkdir()
    docs = [np.array([0, 7, 8, 2]), np.array([0, 9, 0, 9, 2]), np.array([0, 5, 2])]  # 12 tokens: 2 blocks
    for split, file in (("train", "train.bin"), ("validation", "validation.bin")):
        w = SplitWriter(d / file, seq_len, np.dtype("<u2"), starts_path=d / blocks.starts_file(file))
        w.add_stream(np.concatenate(docs), [len(x) for x in docs])
        w.close()
    write_store(tmp_path, {}, seq_len, num_blocks={"train": 2, "validation": 2}, cls_token_id=0,
                document_starts=True)
    return d


def test_block_store_reads_the_recorded_starts(tmp_path):
    d = _store_with_starts(tmp_path)
    store = BlockStore.open(d, "train")
    assert store.has_starts
    ids, starts = store.read_documents([1, 0, 1])
    assert ids.tolist() == [[0, 9, 2, 0, 5, 2], [0, 7, 8, 2, 0, 9], [0, 9, 2, 0, 5, 2]]
    # the 0 inside the second document (block 1's first token) starts nothing: only the record does
    assert starts.tolist()[:2] == [[False, False, False, True, False, False], [True, False, False, False, True, False]]
    assert np.array_equal(starts[2], starts[0])
    # a store prepared before the record: the starts are the cls id's positions (as before)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "document_starts"}))
    old = BlockStore.open(d, "train")
    assert not old.has_starts and old.read_documents([1])[1].tolist() == [[True, False, False, True, False, False]]


def test_missing_or_damaged_starts_are_refused(tmp_path):
    d = _store_with_starts(tmp_path)
    (d / "train.starts.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"train\.starts\.bin is damaged: 1 bytes.*2 blocks.*--force"):
        BlockStore.open(d, "train")
    (d / "train.starts.bin").unlink()
    with pytest.raises(DataError, match=r"train\.starts\.bin is missing.*--force"):
        BlockStore.open(d, "train")
    assert BlockStore.open(d, "validation").has_starts


def test_a_store_without_the_record_is_noted_once(tmp_path, capsys):
    from mlmtool.data.stores import document_starts

    d = _store_with_starts(tmp_path)
    assert document_starts(BlockStore.open(d, "train"), True) and not capsys.readouterr().out  # recorded: no word
    assert not document_starts(BlockStore.open(d, "train"), False)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "document_starts"}))
    train, validation = BlockStore.open(d, "train"), BlockStore.open(d, "validation")
    assert document_starts(train, True) and document_starts(validation, True)
    out = capsys.readouterr().out
    assert out.count("record no document starts") == 1 and "--force" in out, out  # one line, once per store
    (d / "meta.json").write_text(json.dumps({**meta, "line_by_line": True}))
    assert not document_starts(BlockStore.open(d, "train"), True)  # one document per block: nothing to do
