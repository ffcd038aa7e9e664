"""Tokenize a corpus into the block store (``mlmtool prepare DIR FILE...``).

Pipeline (linear time, bounded memory):

1. The main process streams the corpus (:mod:`mlmtool.corpus`) in batches of about
   1 MB of text and numbers the documents 0, 1, 2, ... in corpus order.
2. Worker processes (``num_proc``, fork) load the tokenizer from ``tokenizer.json`` with
   the ``tokenizers`` library and encode each batch exactly as ``encode_batch`` would,
   special tokens included (``<s> … </s>`` / ``[CLS] … [SEP]``, no truncation),
   single-threaded each (``TOKENIZERS_PARALLELISM=false``); a cache of space-separated
   pieces (:class:`PieceEncoder`) makes that 2-3x cheaper than plain ``encode_batch``.
   They split the batch's documents into train and validation and return one numpy
   token array per split (or, line by line, ready blocks).  At most a few batches are in
   flight; results are consumed in order, so the output does not depend on ``num_proc``.
3. The main process appends each split's tokens to its file and cuts full blocks of
   ``max_seq_length``, carrying the remainder (< max_seq_length tokens) over; only the
   final remainder of each split is dropped.

Validation split rule (systematic, by document): with p = validation_split_percentage,
document i (0-based, in corpus order, counting only non-empty documents) goes to
validation when ``floor((i + 1) * p / 100) > floor(i * p / 100)``.  Any first n
documents then hold floor(n * p / 100) validation documents, spread evenly through the
corpus (p = 5: documents 19, 39, 59, ...), without knowing n up front.  p is taken to
1e-4 % (integer arithmetic, no float rounding).

Everything is written into a temporary directory that replaces ``DIR/data`` whole at
the end.  A second run with the same inputs (path, size, mtime), tokenizer.json
(sha256), relevant config fields and arguments prints "up to date" without importing
transformers or JAX and without reading the corpus.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from mlmtool import blocks
from mlmtool.corpus import DEFAULT_BATCH_BYTES, Corpus
from mlmtool.errors import ConfigError, DataError
from mlmtool.modeldir import ModelDir, atomic_directory, atomic_write_json, remove_leftovers

DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_VALIDATION_SPLIT_PERCENTAGE = 5.0
VALIDATION_RULE = "systematic: document i -> validation iff floor((i+1)*p/100) > floor(i*p/100)"
_PPM = 1_000_000          # percentages are applied in parts per million (p to 1e-4 %)
_IN_FLIGHT_PER_PROC = 3   # batches queued per worker: enough to keep them busy, bounded memory


# -- validation split ----------------------------------------------------------------------

def _ppm(percentage: float) -> int:
    return int(round(float(percentage) * _PPM / 100))


def validation_mask(start: int, count: int, percentage: float) -> np.ndarray:
    """Boolean mask: which of documents ``start .. start+count-1`` go to validation."""
    q = _ppm(percentage)
    i = np.arange(start, start + count, dtype=np.int64)
    return ((i + 1) * q) // _PPM > (i * q) // _PPM


def is_validation(index: int, percentage: float) -> bool:
    """Whether document ``index`` goes to validation (the rule of :func:`validation_mask`)."""
    q = _ppm(percentage)
    return ((index + 1) * q) // _PPM > (index * q) // _PPM


# -- tokenizer facts, without transformers ------------------------------------------------

@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    pad_token_id: int
    mask_token_id: int
    unk_token_id: int | None
    cls_token_id: int | None
    sep_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    special_token_ids: tuple[int, ...]


_NAME_DEFAULTS = {  # used when tokenizer_config.json is missing
    "bpe": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
            "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"},
    "wordpiece": {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"},
}


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_info(model_dir: ModelDir) -> TokenizerInfo:
    """Special ids, size and hash of DIR's tokenizer (tokenizers only, no transformers)."""
    from tokenizers import Tokenizer

    from mlmtool.tokenizer_train import file_sha256

    path = model_dir.require_tokenizer()
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"cannot load {path} ({e})",
                        f"retrain it with 'mlmtool tokenizer {model_dir} FILE...'") from None
    names: dict[str, Any] = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            names = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            names = {}
    if not any(_token_name(names.get(k)) for k in ("mask_token", "pad_token")):
        names = _NAME_DEFAULTS["bpe" if tok.token_to_id("<mask>") is not None else "wordpiece"]

    def tid(key: str) -> int | None:
        name = _token_name(names.get(key))
        return tok.token_to_id(name) if name else None

    ids = {k: tid(k) for k in ("pad_token", "mask_token", "unk_token", "cls_token", "sep_token",
                               "bos_token", "eos_token")}
    for key in ("pad_token", "mask_token"):
        if ids[key] is None:
            raise DataError(f"the tokenizer in {model_dir} has no {key.replace('_', ' ')}",
                            f"retrain it with 'mlmtool tokenizer {model_dir} FILE...'")
    special = {i for i in ids.values() if i is not None}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = names.get(key)
        if isinstance(extra, list):
            special.update(i for i in (tok.token_to_id(_token_name(t) or "") for t in extra)
                           if i is not None)
    special.update(t.get("id") for t in json.loads(path.read_text(encoding="utf-8"))
                   .get("added_tokens", []) if t.get("special") and isinstance(t.get("id"), int))
    return TokenizerInfo(
        path=str(path), sha256=file_sha256(path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        pad_token_id=ids["pad_token"], mask_token_id=ids["mask_token"],
        unk_token_id=ids["unk_token"], cls_token_id=ids["cls_token"], sep_token_id=ids["sep_token"],
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
        special_token_ids=tuple(sorted(special)))


# -- workers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    tokenizer_path: str
    seq_len: int
    line_by_line: bool
    percentage: float
    dtype: str
    pad_token_id: int
    piece_cache: bool = True


_worker: dict[str, Any] = {}


def _init_worker(job: _Job, worker_process: bool = True) -> None:
    """Load the tokenizer for ``job`` (in a worker process, or in this one)."""
    from tokenizers import Tokenizer

    if worker_process:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and SIGTERM: it cleans up, then shuts the pool down
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        _exit_with_parent()
    tok = Tokenizer.from_file(job.tokenizer_path)
    tok.no_truncation()
    tok.no_padding()
    encoder = PieceEncoder(tok)
    if not job.piece_cache:
        encoder.enabled = False
    _worker.clear()
    _worker.update(job=job, tok=tok, encoder=encoder)


def _exit_with_parent() -> None:
    """In a worker process: exit when the parent is gone (killed with -9, it cannot shut
    the pool down, and the workers would wait for tasks forever)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="mlmtool-parent-watch", daemon=True).start()


class PieceEncoder:
    r"""Encode documents exactly as ``tokenizer.encode_batch`` does (special tokens
    included), about twice as fast or more, by caching the encoding of space-separated pieces.

    A document is cut at every single space that lies between two non-whitespace
    characters ("the cat" → "the", " cat"; the space goes with the piece after it).  With
    the pipelines mlmtool trains, the tokens of the document are exactly the tokens of
    its pieces, one after the other, between the post-processor's prefix and suffix:

    * ByteLevel (no prefix space) splits with the GPT-2 pattern, none of whose matches
      crosses such a space except one starting at it (`` ?\p{L}+`` etc.); BPE works per
      pre-token.  BertPreTokenizer splits at whitespace anyway; WordPiece works per word.
    * Lowercase and BertNormalizer act per character (a space is a starter, so NFD and
      accent stripping do not cross it either).
    * added tokens hold no whitespace and never strip to the right; ``lstrip`` (RoBERTa's
      ``<mask>``) takes the space at the start of its piece as it would in the document.

    Python's ``\s`` covers every character the tokenizers' regex engine calls whitespace,
    so "between two non-whitespace characters" is decided conservatively.  Pieces repeat
    (Zipf), so most are looked up, not tokenized; the unique ones are encoded in one batch
    call.  :meth:`supports` admits only tokenizers of that shape, and a self-check on
    tricky text at start-up falls back to plain ``encode_batch`` on any difference.
    """

    _SPLIT = re.compile(r"(?<=\S)(?= \S)")
    _CHECK_TEXTS = (
        "Hello world, it's 3.14 -- ok?", " leading and trailing ", "double  space\tand tab",
        "<mask> The <mask>. A<mask>b <s> </s> [MASK] [CLS]", "naïve Émile ΟΔΟΣ straße 日本語 😀 x",
        "a \u00a0b\u3000c \u200bd \x1ce", "don't 've 're 'll 'd 's", "x" * 300 + " y",
        "  ", "tab\t", "mixed \t space", "a\u0301 \u0301b",
    )

    _PRE, _SUF = 0, 1   # piece ids of the post-processor's prefix and suffix

    def __init__(self, tok, max_entries: int = 400_000):
        self.tok = tok
        self.max_entries = max_entries
        self.prefix, self.suffix = self._frame(tok)
        self._reset()
        self.enabled = self.prefix is not None and self._self_check()

    def _reset(self) -> None:
        """Empty cache: piece strings → piece ids → token ids in one flat table."""
        self.first: dict[str, int] = {}    # piece at the start of a document
        self.spaced: dict[str, int] = {}   # piece after a space (key without the space)
        self._tokens = np.zeros(1 << 16, dtype=np.int64)  # token ids of all pieces, back to back
        self._start = np.zeros(1 << 12, dtype=np.int64)   # piece id → offset in _tokens
        self._len = np.zeros(1 << 12, dtype=np.int64)     # piece id → number of tokens
        self._pieces_n = self._tokens_n = 0
        if self.prefix is not None:
            self._add([self.prefix, self.suffix])  # ids 0 and 1

    @staticmethod
    def supports(tokenizer_json: dict) -> bool:
        """Whether the tokenizer's pipeline is one for which piece caching is exact."""
        norm = tokenizer_json.get("normalizer")
        if norm is not None and norm.get("type") not in ("Lowercase", "BertNormalizer"):
            return False
        pre = tokenizer_json.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel":
            if pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
                return False
        elif pre.get("type") != "BertPreTokenizer":
            return False
        model = tokenizer_json.get("model") or {}
        if model.get("type") not in ("BPE", "WordPiece") or model.get("dropout"):
            return False
        for t in tokenizer_json.get("added_tokens") or []:
            content = t.get("content", "")
            if (not content or any(c.isspace() for c in content) or t.get("rstrip")
                    or t.get("single_word")):
                return False
        return True

    @staticmethod
    def _frame(tok) -> tuple[list[int] | None, list[int] | None]:
        """The post-processor's tokens before and after a document's own."""
        frame = tok.encode("", add_special_tokens=True).ids
        full = tok.encode("a b", add_special_tokens=True).ids
        bare = tok.encode("a b", add_special_tokens=False).ids
        for k in range(len(frame) + 1):
            if full == frame[:k] + bare + frame[k:]:
                return frame[:k], frame[k:]
        return None, None

    def _self_check(self) -> bool:
        texts = list(self._CHECK_TEXTS)
        want = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]
        got = self.encode_lists(texts, check=False)
        self._reset()
        return got == want

    def _add(self, id_lists: list[list[int]]) -> list[int]:
        """Append pieces' token ids to the table; their new piece ids."""
        lens = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        n_tok = int(lens.sum())
        first_id, first_tok = self._pieces_n, self._tokens_n
        if first_tok + n_tok > self._tokens.size:
            self._tokens = np.resize(self._tokens, max(2 * self._tokens.size, first_tok + n_tok))
        if first_id + len(id_lists) > self._start.size:
            size = max(2 * self._start.size, first_id + len(id_lists))
            self._start, self._len = np.resize(self._start, size), np.resize(self._len, size)
        self._tokens[first_tok:first_tok + n_tok] = np.fromiter(
            chain.from_iterable(id_lists), dtype=np.int64, count=n_tok)
        ends = np.cumsum(lens)
        self._start[first_id:first_id + len(id_lists)] = first_tok + ends - lens
        self._len[first_id:first_id + len(id_lists)] = lens
        self._pieces_n += len(id_lists)
        self._tokens_n += n_tok
        return list(range(first_id, first_id + len(id_lists)))

    def _pieces(self, docs: list[str]) -> tuple[list[str], list[list[str]]]:
        firsts, rests = [], []
        split = self._SPLIT.split
        for doc in docs:
            if doc.isprintable() and "  " not in doc and doc[:1] != " " and doc[-1:] != " ":
                parts = doc.split(" ")          # every space is single, between non-spaces
                firsts.append(parts[0])
                rests.append(parts[1:])
            else:
                parts = split(doc)
                firsts.append(parts[0])
                rests.append([p[1:] for p in parts[1:]])
        return firsts, rests

    def _lookup(self, cache: dict[str, int], keys: list[str], prefix: str) -> np.ndarray:
        """Piece ids of ``keys``, encoding (with ``prefix``) and adding the ones not cached."""
        ids = np.fromiter(map(cache.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        miss = np.flatnonzero(ids < 0)
        if miss.size:
            new = list(dict.fromkeys([keys[i] for i in miss]))
            encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
            encs = encode([prefix + k for k in new] if prefix else new, add_special_tokens=False)
            cache.update(zip(new, self._add([e.ids for e in encs])))
            ids[miss] = [cache[keys[i]] for i in miss]
        return ids

    def _encode(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all token ids, special tokens included, concatenated; tokens per document)."""
        if len(self.first) + len(self.spaced) > self.max_entries:
            self._reset()  # bounded memory: start over (rare; costs re-encoding)
        firsts, rests = self._pieces(docs)
        flat_rest = list(chain.from_iterable(rests))
        first_ids = self._lookup(self.first, firsts, "")
        rest_ids = self._lookup(self.spaced, flat_rest, " ")
        # per document: prefix, first piece, the other pieces, suffix
        per_doc = np.fromiter(map(len, rests), dtype=np.int64, count=len(rests)) + 3
        ends = np.cumsum(per_doc)
        starts = ends - per_doc
        seq = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        fixed = np.zeros(seq.size, dtype=bool)
        fixed[starts] = fixed[starts + 1] = fixed[ends - 1] = True
        seq[starts] = self._PRE
        seq[starts + 1] = first_ids
        seq[ends - 1] = self._SUF
        seq[~fixed] = rest_ids
        # gather the pieces' tokens from the table
        lens = self._len[seq]
        out_start = np.cumsum(lens) - lens
        index = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(self._start[seq] - out_start, lens)
        tokens = self._tokens[index]
        per_doc_tokens = np.add.reduceat(lens, starts) if len(starts) else np.zeros(0, np.int64)
        return tokens, per_doc_tokens

    def _direct(self, docs: list[str]) -> list[list[int]]:
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(docs, add_special_tokens=True)]

    def encode_lists(self, docs: list[str], check: bool = True) -> list[list[int]]:
        """Token ids of each document, special tokens included."""
        if check and not self.enabled:
            return self._direct(docs)
        if not docs:
            return []
        tokens, counts = self._encode(docs)
        return [a.tolist() for a in np.split(tokens, np.cumsum(counts)[:-1])]

    def encode_flat(self, docs: list[str], dtype: np.dtype) -> np.ndarray:
        """The documents' token ids, special tokens included, concatenated."""
        if not docs:
            return np.zeros(0, dtype=dtype)
        if not self.enabled:
            return _concat(self._direct(docs), dtype)
        return self._encode(docs)[0].astype(dtype)


def _concat(ids: list[list[int]], dtype: np.dtype) -> np.ndarray:
    if not ids:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.array(x, dtype=dtype) for x in ids])


def _to_blocks(ids: list[list[int]], seq_len: int, pad: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
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


def _encode_task(task: tuple[int, list[str], int]) -> tuple[int, int, dict[str, dict]]:
    """Worker: encode one batch; per split its tokens (or blocks) and counts."""
    start, docs, progress = task
    job: _Job = _worker["job"]
    enc: PieceEncoder = _worker["encoder"]
    dtype = np.dtype(job.dtype)
    val = validation_mask(start, len(docs), job.percentage) if job.percentage else None
    parts = {"train": docs, "validation": []}
    if val is not None and val.any():
        parts = {"train": [d for d, v in zip(docs, val) if not v],
                 "validation": [d for d, v in zip(docs, val) if v]}
    out = {}
    for split, split_docs in parts.items():
        if job.line_by_line:
            ids = enc.encode_lists(split_docs)
            tokens = sum(map(len, ids))
            data, cut = _to_blocks(ids, job.seq_len, job.pad_token_id, dtype)
        else:
            data = enc.encode_flat(split_docs, dtype)
            tokens, cut = int(data.size), 0
        out[split] = {"data": data, "documents": len(split_docs), "tokens": tokens, "truncated": cut}
    return progress, len(docs), out


def _tasks(corpus: Corpus, batch_bytes: int) -> Iterator[tuple[int, list[str], int]]:
    start = 0
    for batch in corpus.batches(batch_bytes=batch_bytes):
        yield start, batch.documents, batch.progress
        start += len(batch.documents)


@contextlib.contextmanager
def _tokenizers_parallelism(value: str):
    """Set TOKENIZERS_PARALLELISM for the duration (tokenizers reads it on each batch call)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def fork_is_safe() -> bool:
    """Whether worker processes may be forked from this process.

    Not once JAX is imported: forking a process whose JAX runtime threads hold locks can
    deadlock the child (mlmtool's own corpus/prepare modules never import it; a script or
    test that did gets the threaded fallback of :func:`_results`).
    """
    import multiprocessing

    return "jax" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()


def _results(tasks: Iterable, job: _Job, num_proc: int) -> Iterator:
    """Encoded batches in task order.

    num_proc > 1: that many forked worker processes, a bounded number of batches in flight
    (memory stays flat), results taken in submission order (output independent of
    num_proc).  Where fork is unsafe (:func:`fork_is_safe`), this process encodes with
    tokenizers' own thread pool instead.  num_proc == 1: this process, one thread.
    """
    if num_proc <= 1 or not fork_is_safe():
        with _tokenizers_parallelism("false" if num_proc <= 1 else "true"):
            _init_worker(job, worker_process=False)
            try:
                for task in tasks:
                    yield _encode_task(task)
            finally:
                _worker.clear()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("fork")  # starts in milliseconds, inherits nothing big
    # ProcessPoolExecutor rather than Pool: a worker that dies (killed, out of memory)
    # raises BrokenProcessPool instead of hanging the run.
    pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=(job,))
    try:
        pending: deque = deque()
        window = _IN_FLIGHT_PER_PROC * num_proc
        for task in tasks:
            pending.append(pool.submit(_encode_task, task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died (out of memory, or killed)",
                        "retry, with a smaller --num-proc if memory is short") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- the command ---------------------------------------------------------------------------

def _key(corpus: Corpus, tokenizer_sha256: str, config: dict, args: dict) -> dict:
    """What the blocks depend on: "up to date" compares it with meta.json's."""
    return {
        "format_version": blocks.VERSION,
        "inputs": corpus.fingerprint(),
        "tokenizer_sha256": tokenizer_sha256,
        "config": {k: config[k] for k in ("model_type", "max_position_embeddings", "pad_token_id",
                                          "vocab_size")},
        "args": args,
    }


def _up_to_date(data_dir: Path, key: dict) -> dict | None:
    try:
        meta = blocks.read_meta(data_dir)
        if meta.get("key") != key:
            return None
        for split in blocks.SPLITS:
            blocks.BlockStore.open(data_dir, split)
    except DataError:
        return None
    return meta


def _summary(meta: dict, data_dir: Path, status: str, seconds: float, num_proc: int | None) -> dict:
    docs = meta["documents"]
    return {
        "status": status,
        "data_dir": str(data_dir),
        "seq_len": meta["seq_len"],
        "line_by_line": meta["line_by_line"],
        "documents": sum(docs.values()),
        "tokens": sum(meta["tokens"].values()),
        "blocks": sum(meta["num_blocks"].values()),
        "num_blocks": meta["num_blocks"],
        "documents_per_split": docs,
        "tokens_per_split": meta["tokens"],
        "dropped_tokens": meta["dropped_tokens"],
        "bytes": meta.get("bytes", 0),
        "seconds": round(seconds, 3),
        "mb_per_s": round(meta.get("bytes", 0) / 1e6 / seconds, 2) if seconds > 0 else None,
        "num_proc": num_proc,
        "parallelism": meta.get("parallelism"),
        "skipped_lines": meta.get("skipped_lines", 0),
    }


def prepare(model_dir: ModelDir | str | os.PathLike, corpus: Corpus, *,
            max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, line_by_line: bool = False,
            validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
            num_proc: int | None = None, force: bool = False,
            show_progress: bool = True, batch_bytes: int = DEFAULT_BATCH_BYTES,
            piece_cache: bool = True) -> dict[str, Any]:
    """Tokenize ``corpus`` into ``DIR/data`` (see the module doc); return a summary dict.

    ``status`` in the result is "written" or "up to date" (nothing done).  ``num_proc``
    defaults to the number of CPU cores; ``batch_bytes`` is the text per worker task (it
    changes speed only, never the output); ``piece_cache=False`` encodes every document
    with plain ``encode_batch`` (same output, slower: see :class:`PieceEncoder`).
    """
    started = time.perf_counter()
    mdir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    if not mdir.config_path.exists():
        mdir.read_config()  # raises "run 'mlmtool init DIR' first"
    mdir.require_tokenizer()
    config = mdir.read_config()  # without transformers when config.json is complete

    from mlmtool.presets import max_sequence_length
    from mlmtool.tokenizer_train import file_sha256

    limit = max_sequence_length(config)
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length must be at least 2, got {max_seq_length}",
                          "use e.g. --max-seq-length 128")
    if max_seq_length > limit:
        raise ConfigError(f"--max-seq-length {max_seq_length} exceeds the model's limit of {limit} "
                          f"positions (max_position_embeddings {config['max_position_embeddings']})",
                          f"use --max-seq-length {limit} or less, or raise max_position_embeddings "
                          "with 'mlmtool init DIR --set ... --force'")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_proc is not None and not 1 <= num_proc <= 4 * cores:
        raise ConfigError(f"--num-proc {num_proc} is not in 1 .. {4 * cores} (4 x the {cores} CPU cores)",
                          f"use --num-proc {cores}, or leave it out (one per core)")
    if not 0 <= validation_split_percentage < 100:
        raise ConfigError(f"--validation-split-percentage must be in [0, 100), got "
                          f"{validation_split_percentage}", "use e.g. 5 (or 0 for no validation)")

    args = {"max_seq_length": max_seq_length, "line_by_line": line_by_line,
            "validation_split_percentage": float(validation_split_percentage)}
    key = _key(corpus, file_sha256(mdir.tokenizer_path), config, args)
    if not force:  # checked before loading the tokenizer: this path must stay fast
        meta = _up_to_date(mdir.data_dir, key)
        if meta is not None:
            return _summary(meta, mdir.data_dir, "up to date", time.perf_counter() - started, None)

    tok = tokenizer_info(mdir)
    if tok.vocab_size != config["vocab_size"]:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size "
                          f"is {config['vocab_size']}",
                          f"retrain with 'mlmtool tokenizer {mdir} FILE...' (it updates config.json)")
    if tok.pad_token_id != config["pad_token_id"]:
        raise ConfigError(f"config.json pad_token_id {config['pad_token_id']} differs from the "
                          f"tokenizer's {tok.pad_token_id}",
                          f"retrain with 'mlmtool tokenizer {mdir} FILE...' (it updates config.json)")
    key["tokenizer_sha256"] = tok.sha256  # the same file, unless it changed meanwhile
    with mdir.lock("prepare"):
        remove_leftovers(mdir.data_dir)  # the .data.*.tmp of a killed run
        result = _build(mdir, corpus, tok, key, args, started=started, num_proc=num_proc,
                      show_progress=show_progress, batch_bytes=batch_bytes, piece_cache=piece_cache)
    if line_by_line:
        from tokenizers import Tokenizer

        frame = len(Tokenizer.from_file(tok.path).encode("", add_special_tokens=True).ids)
        if max_seq_length <= frame:  # every block is <s> </s>: train and eval refuse to score nothing
            result["warnings"] = [f"--line-by-line blocks of {max_seq_length} tokens hold only the {frame} special "
                                  "tokens around each document, no token to predict (train and eval refuse them): "
                                  f"prepare again with --max-seq-length {frame + 1} or more (e.g. 128) and --force"]
    return result


def _build(mdir: ModelDir, corpus: Corpus, tok: TokenizerInfo, key: dict, args: dict, *,
           started: float, num_proc: int | None, show_progress: bool, batch_bytes: int,
           piece_cache: bool) -> dict[str, Any]:
    """Tokenize into a temporary directory and swap it in as DIR/data (lock held)."""
    max_seq_length = args["max_seq_length"]
    line_by_line = args["line_by_line"]
    validation_split_percentage = args["validation_split_percentage"]
    num_proc = max(1, int(num_proc or os.cpu_count() or 1))
    parallelism = ("single process" if num_proc == 1 else
                   f"{num_proc} processes" if fork_is_safe() else "tokenizers threads")
    dtype = blocks.dtype_for_vocab(tok.vocab_size)
    piece_cache = piece_cache and PieceEncoder.supports(
        json.loads(Path(tok.path).read_text(encoding="utf-8")))
    job = _Job(tokenizer_path=tok.path, seq_len=max_seq_length, line_by_line=line_by_line,
               percentage=float(validation_split_percentage), dtype=dtype.str,
               pad_token_id=tok.pad_token_id, piece_cache=piece_cache)
    counts = {s: {"documents": 0, "tokens": 0, "truncated": 0} for s in blocks.SPLITS}

    from mlmtool.progress import StageProgress

    progress = StageProgress("Tokenizing", total=corpus.total, unit=corpus.unit)
    with atomic_directory(mdir.data_dir) as tmp:
        writers = {s: blocks.SplitWriter(tmp / blocks.split_file(s), max_seq_length, dtype)
                   for s in blocks.SPLITS}
        try:
            with (progress if show_progress else contextlib.nullcontext(progress)):
                for adv, ndocs, out in _results(_tasks(corpus, batch_bytes), job, num_proc):
                    tokens = 0
                    for split, part in out.items():
                        c = counts[split]
                        c["documents"] += part["documents"]
                        c["tokens"] += part["tokens"]
                        c["truncated"] += part["truncated"]
                        tokens += part["tokens"]
                        if line_by_line:
                            writers[split].add_blocks(part["data"])
                        else:
                            writers[split].add_stream(part["data"])
                    if show_progress:
                        progress.advance(adv, documents=ndocs, tokens=tokens)
            for w in writers.values():
                w.close()
        finally:
            for w in writers.values():
                w.abort()
        _check_nonempty(writers, counts, max_seq_length, validation_split_percentage, line_by_line)
        seconds = time.perf_counter() - started
        meta = {
            "format": blocks.FORMAT,
            "version": blocks.VERSION,
            "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
            "seq_len": max_seq_length,
            "line_by_line": line_by_line,
            "splits": list(blocks.SPLITS),
            "files": {s: blocks.split_file(s) for s in blocks.SPLITS},
            "num_blocks": {s: writers[s].num_blocks for s in blocks.SPLITS},
            "tokens": {s: counts[s]["tokens"] for s in blocks.SPLITS},
            "documents": {s: counts[s]["documents"] for s in blocks.SPLITS},
            "dropped_tokens": {s: writers[s].dropped_tokens + counts[s]["truncated"]
                               for s in blocks.SPLITS},
            "pad_token_id": tok.pad_token_id,
            "mask_token_id": tok.mask_token_id,
            "unk_token_id": tok.unk_token_id,
            "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "special_token_ids": list(tok.special_token_ids),
            "vocab_size": tok.vocab_size,
            "validation_split_percentage": float(validation_split_percentage),
            "validation_rule": VALIDATION_RULE,
            "fingerprint": key["inputs"],
            "tokenizer_sha256": tok.sha256,
            "key": key,
            "bytes": corpus.stats.bytes,
            "skipped_lines": corpus.stats.skipped,
            "num_proc": num_proc,
            "parallelism": parallelism,
            "seconds": round(seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(tmp / blocks.META, meta)
    result = _summary(meta, mdir.data_dir, "written", seconds, num_proc)
    mdir.record("prepare", args={**args, "text_column": corpus.text_column, "num_proc": num_proc},
                inputs=key["inputs"],
                outputs={k: meta[k] for k in ("num_blocks", "tokens", "documents", "seq_len", "dtype")}
                | {"tokenizer_sha256": tok.sha256})
    return result


def _check_nonempty(writers, counts, seq_len: int, percentage: float, line_by_line: bool) -> None:
    train = writers["train"]
    if train.num_blocks == 0:
        c = counts["train"]
        raise DataError(f"the corpus is too small: its training split has {c['tokens']:,} tokens "
                        f"({c['documents']:,} documents), not one block of {seq_len}",
                        "add text or lower --max-seq-length")
    if percentage > 0 and writers["validation"].num_blocks == 0:
        c = counts["validation"]
        total_docs = counts["train"]["documents"] + c["documents"]
        raise DataError(f"the validation split ({percentage:g}% of {total_docs:,} documents = "
                        f"{c['documents']:,} documents, {c['tokens']:,} tokens) holds no block of "
                        f"{seq_len} tokens",
                        "add text, lower --max-seq-length, or change "
                        "--validation-split-percentage (0 for no validation split)")


__all__ = ["prepare", "validation_mask", "is_validation", "tokenizer_info", "TokenizerInfo",
           "DEFAULT_MAX_SEQ_LENGTH", "DEFAULT_VALIDATION_SPLIT_PERCENTAGE", "VALIDATION_RULE"]
