"""The block store: tokenized, fixed-length training blocks on disk (``DIR/data``).

Layout::

    DIR/data/meta.json         what is stored (see below)
    DIR/data/train.bin         raw little-endian uint16 (vocab ≤ 65536) or uint32,
    DIR/data/validation.bin    row-major [num_blocks, seq_len]
    DIR/data/train.starts.bin  where documents start, beside each split file (concatenated
    DIR/data/validation.starts.bin  stores; meta.json's document_starts): packed bits
                               [num_blocks, ceil(seq_len / 8)], bit i of a block set where a
                               document's first token is (np.packbits, big-endian bit order)

A store of ``prepare --num-shards N`` (N > 1, :mod:`mlmtool.data.shards`) holds one pair of files
per shard instead (``train-00003-of-00008.bin``...), listed in shard order in meta.json's
``shards`` (each with its ``files``, ``num_blocks`` and ``sha256``); :class:`BlockStore`
reads the split as the shards' blocks one after another, as if it were one file.

Raw arrays, so a block is read by slice through ``np.memmap`` with no parsing and no
per-example overhead; ``meta.json`` carries everything needed to read them::

    format, version            "mlmtool-blocks", 1
    dtype                      "uint16" | "uint32" (little-endian on disk)
    seq_len                    tokens per block
    line_by_line               False: the documents' token stream concatenated and cut
                               into blocks (remainder dropped); True: one document per
                               block, truncated (keeping its last token) and padded
    document_starts            true: the ``.starts.bin`` files record where each document
                               starts (what --document-attention's segments are made of);
                               absent in stores made before they were recorded (the starts
                               are then derived from the ``<s>``/``[CLS]`` id, with a notice)
    splits                     ["train", "validation"]
    num_blocks / tokens /      per split: blocks stored; tokens the tokenizer produced;
    documents / dropped_tokens documents; tokens not stored (remainder, truncation)
    pad_token_id, mask_token_id, cls_token_id, sep_token_id, unk_token_id,
    bos_token_id, eos_token_id special token ids (bos/eos null for WordPiece)
    special_token_ids          all special ids (sorted), as transformers' all_special_ids
    vocab_size                 the tokenizer's size (len(tokenizer)): every stored id is below it,
                               and masking draws its random tokens below it
    model_vocab_size           config.json's vocab_size when prepared (>= vocab_size: a padded
                               embedding matrix; absent in stores made before it was recorded)
    validation_split_percentage, validation_rule
    fingerprint                the corpus inputs (see mlmtool.data.corpus)
    tokenizer_sha256           hash of the tokenizer.json the blocks were made with
    key                        what "up to date" compares (inputs, tokenizer, arguments)
    files                      {split: file name}
    shards, num_shards         the shard ledger (above); packing_loss_blocks: blocks the shards'
                               dropped remainders would have made in one stream
    created, seconds           when and how long

Readers use :class:`BlockStore`; writers :class:`SplitWriter` (inside a temporary
directory that ``modeldir.atomic_directory`` swaps in whole); multi-process runs compare
:func:`store_fingerprint` (``distributed.agree``) so that every host reads the same blocks.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlmtool.errors import DataError

FORMAT = "mlmtool-blocks"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "validation")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size ≤ 65536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _np_dtype(name: str) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise DataError(f"unknown block dtype {name!r} in meta.json", _REDO)
    return np.dtype("<u2") if name == "uint16" else np.dtype("<u4")


_REDO = "rerun 'mlmtool prepare DIR FILE... --force'"


def split_file(split: str) -> str:
    return f"{split}.bin"


def starts_file(blocks_file: str) -> str:
    """The document-starts file beside a split's (or a shard's) blocks file."""
    return f"{blocks_file[:-len('.bin')] if blocks_file.endswith('.bin') else blocks_file}.starts.bin"


def starts_row_bytes(seq_len: int) -> int:
    return (int(seq_len) + 7) // 8


def read_meta(data_dir: Path | str) -> dict:
    """``data_dir/meta.json`` (DataError if missing, unreadable or not a block store)."""
    path = Path(data_dir) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no prepared data in {Path(data_dir)} (no {META})",
                        "run 'mlmtool prepare DIR FILE...' first") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e.__class__.__name__})", _REDO) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an mlmtool block store", _REDO)
    if meta.get("version") != VERSION:
        raise DataError(f"{path} has block store version {meta.get('version')!r}; this mlmtool "
                        f"reads version {VERSION}", _REDO)
    return meta


class BlockStore:
    """One split of the block store, read by index or range through ``np.memmap``.

    Reads return ``int32`` arrays of shape ``[n, seq_len]``.
    """

    def __init__(self, path: Path, meta: dict, split: str, parts: list[tuple[Path, int]] | None = None):
        self.path = Path(path)
        self.meta = meta
        self.split = split
        self.seq_len = int(meta["seq_len"])
        self.num_blocks = int(meta["num_blocks"][split])
        self.pad_token_id = int(meta["pad_token_id"])
        self.mask_token_id = int(meta["mask_token_id"])
        self.special_token_ids = tuple(int(i) for i in meta["special_token_ids"])
        self.vocab_size = int(meta["vocab_size"])
        self.line_by_line = bool(meta.get("line_by_line"))  # one document per block (document attention: moot)
        #: where documents start is recorded (prepare writes it); else derived from the cls id
        self.has_starts = bool(meta.get("document_starts")) and not self.line_by_line
        self.dtype = _np_dtype(meta["dtype"])
        self._parts = []  # one memmap per shard file (mlmtool.data.shards), in shard order
        self._start_parts = []  # and of its document starts (packed bits), when recorded
        for p, n in parts or [(self.path, self.num_blocks)]:
            if n:
                self._parts.append(np.memmap(p, dtype=self.dtype, mode="r", shape=(n, self.seq_len)))
                if self.has_starts:
                    self._start_parts.append(np.memmap(p.with_name(starts_file(p.name)), dtype=np.uint8, mode="r",
                                                       shape=(n, starts_row_bytes(self.seq_len))))
        self._starts = np.cumsum([0] + [len(a) for a in self._parts])  # first global block of each part
        if len(self._parts) == 1:
            self._data = self._parts[0]
        elif not self._parts:
            self._data = np.zeros((0, self.seq_len), dtype=self.dtype)
        else:
            self._data = None

    @classmethod
    def open(cls, data_dir: Path | str, split: str) -> "BlockStore":
        """Open ``split`` ("train" or "validation") of the block store in ``data_dir``.

        DataError if it is missing or damaged (file size not matching meta.json).
        """
        data_dir = Path(data_dir)
        meta = read_meta(data_dir)
        if split not in meta.get("num_blocks", {}):
            raise DataError(f"no split {split!r} in {data_dir} "
                            f"(it has: {', '.join(meta.get('num_blocks', {})) or 'none'})",
                            "use 'train' or 'validation'")
        try:
            seq_len = int(meta["seq_len"])
            num_blocks = int(meta["num_blocks"][split])
            itemsize = _np_dtype(meta["dtype"]).itemsize
            for key in ("pad_token_id", "mask_token_id", "special_token_ids", "vocab_size"):
                meta[key]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{data_dir / META} is incomplete ({e.__class__.__name__}: {e})",
                            _REDO) from None
        files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        shards = meta.get("shards") if isinstance(meta.get("shards"), list) else None
        try:  # a sharded store (mlmtool.data.shards): each shard's file and blocks, in shard order
            listed = ([(sh["files"][split], int(sh["num_blocks"][split])) for sh in shards] if shards
                      else [(files.get(split, split_file(split)), num_blocks)])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{data_dir / META} is incomplete ({e.__class__.__name__}: {e})", _REDO) from None
        if sum(n for _, n in listed) != num_blocks:
            raise DataError(f"{data_dir / META} is damaged: its shards hold {sum(n for _, n in listed):,} "
                            f"{split} blocks, not {num_blocks:,}", _REDO)
        named = [name for name, _ in listed] + ([files[split]] if split in files else [])
        for name in named:  # every file meta.json names, read or not (files and the shards' ledger)
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                # meta.json names files in DIR/data only: never a path elsewhere (../, /etc/...)
                raise DataError(f"{data_dir / META} names {name!r} for the {split} split, a path outside "
                                f"{data_dir}", _REDO)
        if shards and len(shards) == 1 and split in files and files[split] != listed[0][0]:
            raise DataError(f"{data_dir / META} is damaged: its {split} file is {files[split]!r} but its one "
                            f"shard's is {listed[0][0]!r}", _REDO)
        parts = []
        for name, n in listed:
            path = data_dir / name
            if not path.exists():
                raise DataError(f"{path} is missing", _REDO)
            expected = n * seq_len * itemsize
            actual = path.stat().st_size
            if actual != expected:
                raise DataError(f"{path} is damaged: {actual:,} bytes, meta.json says {n:,} "
                                f"blocks of {seq_len} {meta['dtype']} ({expected:,} bytes)", _REDO)
            if meta.get("document_starts") and not meta.get("line_by_line"):
                starts = path.with_name(starts_file(name))
                size = starts.stat().st_size if starts.exists() else None
                if size != n * starts_row_bytes(seq_len):
                    raise DataError(f"{starts} is {'missing' if size is None else f'damaged: {size:,} bytes'}; "
                                    f"meta.json says {n:,} blocks record their document starts", _REDO)
            parts.append((path, n))
        return cls(parts[0][0], meta, split, parts)

    def __len__(self) -> int:
        return self.num_blocks

    def __repr__(self) -> str:
        return (f"BlockStore({str(self.path)!r}, split={self.split!r}, "
                f"num_blocks={self.num_blocks}, seq_len={self.seq_len})")

    def read(self, indices) -> np.ndarray:
        """Blocks at ``indices`` (any order, repeats allowed) as int32 ``[len(indices), seq_len]``.

        The reads are done in sorted order (locality on disk); the result is in the
        requested order.  Negative or out-of-range indices raise IndexError.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks}) in {self.split}")
        order = np.argsort(idx, kind="stable")
        out = np.empty((idx.size, self.seq_len), dtype=np.int32)
        if self._data is not None:
            out[order] = self._data[idx[order]]
            return out
        sorted_idx = idx[order]  # several shard files: each index read from its part
        part = np.searchsorted(self._starts, sorted_idx, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            out[order[sel]] = self._parts[k][sorted_idx[sel] - self._starts[k]]
        return out

    def read_documents(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Blocks at ``indices`` (as :meth:`read`) and bool ``[len(indices), seq_len]``: True
        where a document starts.  From the record ``prepare`` writes; a store made before it
        (``has_starts`` False) derives them from the ``<s>``/``[CLS]`` id, as older mlmtools did
        on the device (a document of such a store that held a literal ``<s>`` encoded as that id
        is split there)."""
        ids = self.read(indices)
        if not self.has_starts:
            return ids, ids == int(self.meta["cls_token_id"])
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        packed = np.empty((idx.size, starts_row_bytes(self.seq_len)), dtype=np.uint8)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        part = np.searchsorted(self._starts, sorted_idx, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            packed[order[sel]] = self._start_parts[k][sorted_idx[sel] - self._starts[k]]
        return ids, np.unpackbits(packed, axis=1, count=self.seq_len).astype(bool)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Blocks ``start:stop`` as int32 ``[stop - start, seq_len]`` (clipped like a slice)."""
        if self._data is not None:
            return np.asarray(self._data[start:stop], dtype=np.int32)
        start, stop, _ = slice(start, stop).indices(self.num_blocks)
        return self.read(np.arange(start, max(start, stop)))


class SplitWriter:
    """Append blocks of one split to ``path``.

    Concatenated mode: :meth:`add_stream` takes token arrays of any length; full
    ``seq_len`` blocks are written as soon as they exist and only the remainder (fewer
    than ``seq_len`` tokens) is carried over, so time is linear and memory bounded.
    The final remainder is dropped by :meth:`close`.
    Line-by-line mode: :meth:`add_blocks` takes ready ``[n, seq_len]`` blocks.
    With ``starts_path`` (concatenated mode), :meth:`add_stream` also takes the documents'
    token counts and the blocks' document starts are written there (see the module doc).
    """

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, *, starts_path: Path | None = None):
        self.path = Path(path)
        self.seq_len = int(seq_len)
        self.dtype = np.dtype(dtype)
        self._file: BinaryIO = open(self.path, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()  # of the bytes written: the shard's digest (data fingerprint)
        self._rest = np.zeros(0, dtype=self.dtype)
        self.starts_path = None if starts_path is None else Path(starts_path)
        self._starts_file: BinaryIO | None = None if starts_path is None else open(starts_path, "wb",
                                                                                   buffering=1 << 16)
        self._rest_starts = np.zeros(0, dtype=bool)
        self.num_blocks = 0
        self.dropped_tokens = 0

    def add_stream(self, tokens: np.ndarray, lengths=None) -> None:
        """Append documents' tokens laid end to end; ``lengths`` (the tokens of each, in
        order, summing to ``tokens.size``) where document starts are recorded."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        if self._starts_file is not None:
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.sum() != tokens.size or (lengths <= 0).any():
                raise ValueError(f"document lengths summing to {int(lengths.sum())} for {tokens.size} tokens")
            starts = np.zeros(tokens.size, dtype=bool)
            starts[np.cumsum(lengths) - lengths] = True
            starts = np.concatenate([self._rest_starts, starts])
        if self._rest.size:
            tokens = np.concatenate([self._rest, tokens])
        n = tokens.size // self.seq_len
        cut = n * self.seq_len
        if n:
            self._write(tokens[:cut].tobytes())
            if self._starts_file is not None:
                self._starts_file.write(np.packbits(starts[:cut].reshape(n, self.seq_len), axis=1).tobytes())
            self.num_blocks += n
        self._rest = tokens[cut:].copy()
        if self._starts_file is not None:
            self._rest_starts = starts[cut:].copy()

    def add_blocks(self, blocks: np.ndarray) -> None:
        blocks = np.asarray(blocks)
        if blocks.ndim != 2 or blocks.shape[1] != self.seq_len:
            raise ValueError(f"blocks must be [n, {self.seq_len}], got {blocks.shape}")
        self._write(np.ascontiguousarray(blocks, dtype=self.dtype).tobytes())
        self.num_blocks += blocks.shape[0]

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)

    @property
    def sha256(self) -> str:
        """The sha256 of the blocks written so far (hex)."""
        return self._hash.hexdigest()

    @property
    def remainder(self) -> int:
        return int(self._rest.size)

    def close(self) -> None:
        """Drop the remainder, flush and fsync."""
        if self._file.closed:
            return
        self.dropped_tokens += int(self._rest.size)
        self._rest = self._rest[:0]
        import os

        for f in (self._file, self._starts_file):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def abort(self) -> None:
        for f in (self._file, self._starts_file):
            if f is not None and not f.closed:
                f.close()


def document_blocks(ids: list[list[int]], seq_len: int, pad: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """One block per document: truncated keeping its last token, padded; (blocks, tokens cut)."""
    out = np.full((len(ids), seq_len), pad, dtype=dtype)
    cut = 0
    for r, x in enumerate(ids):
        n = len(x)
        if n > seq_len:
            cut += n - seq_len
            out[r, :seq_len - 1] = x[:seq_len - 1]
            out[r, seq_len - 1] = x[-1]
        else:
            out[r, :n] = x
    return out, cut


def store_fingerprint(*stores) -> dict:
    """A cheap fingerprint of block-store splits, to check that every host reads the same
    data: sizes, sequence length, tokenizer, and a checksum of up to 64 blocks spread
    over each split (reading a whole split on every host would take too long)."""
    out: dict = {}
    for store in stores:
        if store is None:
            continue
        n = len(store)
        idx = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64)) if n else np.zeros(0, np.int64)
        out[f"{store.split} blocks"] = n
        out[f"{store.split} checksum"] = zlib.crc32(store.read(idx).tobytes()) if n else 0
        out["seq_len"] = store.seq_len
        out["tokenizer_sha256"] = store.meta.get("tokenizer_sha256")
    return out


# -- the validation split ------------------------------------------------------------------
# Which split a document goes to (mlmtool.data.prepare): systematic, by document, so that any first
# n documents hold floor(n * p / 100) validation documents without knowing n up front.

VALIDATION_RULE = "systematic: document i -> validation iff floor((i+1)*p/100) > floor(i*p/100)"
_PPM = 1_000_000          # percentages are applied in parts per million (p to 1e-4 %)


def _ppm(percentage: float) -> int:
    return int(round(float(percentage) * _PPM / 100))


def validation_mask(start: int, count: int, percentage: float) -> np.ndarray:
    """Boolean mask: which of documents ``start .. start+count-1`` go to validation."""
    q = _ppm(percentage)
    i = np.arange(start, start + count, dtype=np.int64)
    return ((i + 1) * q) // _PPM > (i * q) // _PPM
