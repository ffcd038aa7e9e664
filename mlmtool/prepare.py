"""Tokenize a corpus into the block store (``mlmtool prepare DIR FILE...``).

Pipeline (linear time, bounded memory):

1. The main process streams the corpus (:mod:`mlmtool.corpus`) in batches of about
   1 MB of text and numbers the documents 0, 1, 2, ... in corpus order.
2. Worker processes (``num_proc``, fork) load the tokenizer from ``tokenizer.json`` with
   the ``tokenizers`` library and encode each batch exactly as ``encode_batch`` would,
   special tokens included (``<s> … </s>`` / ``[CLS] … [SEP]``, no truncation),
   single-threaded each (``TOKENIZERS_PARALLELISM=false``); a cache of space-separated
   pieces (:class:`mlmtool.piece_encoder.PieceEncoder`) makes that 2-3x cheaper than plain
   ``encode_batch`` (the pool: :mod:`mlmtool.encode_pool`).
   They split the batch's documents into train and validation and return one numpy
   token array per split (or, line by line, ready blocks).  At most a few batches are in
   flight; results are consumed in order, so the output does not depend on ``num_proc``.
3. The main process appends each split's tokens to its file and cuts full blocks of
   ``max_seq_length``, carrying the remainder (< max_seq_length tokens) over; only the
   final remainder of each split is dropped.

Validation split rule (systematic, by document; ``blocks.validation_mask``): with p = validation_split_percentage,
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
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlmtool import blocks, encode_pool
from mlmtool.blocks import VALIDATION_RULE
from mlmtool.corpus import DEFAULT_BATCH_BYTES, Corpus
from mlmtool.encode_pool import Job, encoded_batches, tasks
from mlmtool.errors import ConfigError, DataError
from mlmtool.modeldir import ModelDir, atomic_directory, atomic_write_json, remove_leftovers
from mlmtool.piece_encoder import PieceEncoder
from mlmtool.tokenizer_facts import TokenizerInfo, tokenizer_info

DEFAULT_MAX_SEQ_LENGTH = 128
DEFAULT_VALIDATION_SPLIT_PERCENTAGE = 5.0


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
    num_proc = max(1, int(num_proc or os.cpu_count() or 1))
    parallelism = ("single process" if num_proc == 1 else
                   f"{num_proc} processes" if encode_pool.fork_is_safe() else "tokenizers threads")
    dtype = blocks.dtype_for_vocab(tok.vocab_size)
    piece_cache = piece_cache and PieceEncoder.supports(
        json.loads(Path(tok.path).read_text(encoding="utf-8")))
    job = Job(tokenizer_path=tok.path, seq_len=max_seq_length, line_by_line=args["line_by_line"],
               percentage=args["validation_split_percentage"], dtype=dtype.str,
               pad_token_id=tok.pad_token_id, piece_cache=piece_cache)
    with atomic_directory(mdir.data_dir) as tmp:
        writers = {s: blocks.SplitWriter(tmp / blocks.split_file(s), max_seq_length, dtype)
                   for s in blocks.SPLITS}
        try:
            counts = _tokenize_into(writers, corpus, job, num_proc=num_proc, batch_bytes=batch_bytes,
                                    show_progress=show_progress)
            for w in writers.values():
                w.close()
        finally:
            for w in writers.values():
                w.abort()
        _check_nonempty(writers, counts, max_seq_length, job.percentage, job.line_by_line)
        seconds = time.perf_counter() - started
        meta = _block_meta(writers, counts, tok, key, args, corpus=corpus, dtype=dtype, num_proc=num_proc,
                           parallelism=parallelism, seconds=seconds)
        atomic_write_json(tmp / blocks.META, meta)
    result = _summary(meta, mdir.data_dir, "written", seconds, num_proc)
    mdir.record("prepare", args={**args, "text_column": corpus.text_column, "num_proc": num_proc},
                inputs=key["inputs"],
                outputs={k: meta[k] for k in ("num_blocks", "tokens", "documents", "seq_len", "dtype")}
                | {"tokenizer_sha256": tok.sha256})
    return result


def _tokenize_into(writers: dict[str, blocks.SplitWriter], corpus: Corpus, job: Job, *, num_proc: int,
                   batch_bytes: int, show_progress: bool) -> dict[str, dict[str, int]]:
    """Encode the corpus (workers, in order) and append each split's tokens or blocks to its
    writer; per split the documents, tokens and tokens truncated away (line by line)."""
    from mlmtool.progress import StageProgress

    counts = {s: {"documents": 0, "tokens": 0, "truncated": 0} for s in blocks.SPLITS}
    progress = StageProgress("Tokenizing", total=corpus.total, unit=corpus.unit)
    with (progress if show_progress else contextlib.nullcontext(progress)):
        for adv, ndocs, out in encoded_batches(tasks(corpus, batch_bytes), job, num_proc):
            tokens = 0
            for split, part in out.items():
                c = counts[split]
                c["documents"] += part["documents"]
                c["tokens"] += part["tokens"]
                c["truncated"] += part["truncated"]
                tokens += part["tokens"]
                if job.line_by_line:
                    writers[split].add_blocks(part["data"])
                else:
                    writers[split].add_stream(part["data"])
            if show_progress:
                progress.advance(adv, documents=ndocs, tokens=tokens)
    return counts


def _block_meta(writers: dict[str, blocks.SplitWriter], counts: dict[str, dict[str, int]], tok: TokenizerInfo,
                key: dict, args: dict, *, corpus: Corpus, dtype: np.dtype, num_proc: int, parallelism: str,
                seconds: float) -> dict[str, Any]:
    """The block store's meta.json (its fields are documented in :mod:`mlmtool.blocks`)."""
    return {
        "format": blocks.FORMAT,
        "version": blocks.VERSION,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "seq_len": args["max_seq_length"],
        "line_by_line": args["line_by_line"],
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
        "validation_split_percentage": args["validation_split_percentage"],
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


__all__ = ["prepare", "DEFAULT_MAX_SEQ_LENGTH", "DEFAULT_VALIDATION_SPLIT_PERCENTAGE",
           "VALIDATION_RULE"]
