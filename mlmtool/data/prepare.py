"""Tokenize a corpus into the block store (``mlmtool prepare DIR FILE...``).

Pipeline (linear time, bounded memory):

1. The main process streams the corpus (:mod:`mlmtool.data.corpus`) in batches of about
   1 MB of text and numbers the documents 0, 1, 2, ... in corpus order.
2. Worker processes (``num_proc``, fork) load the tokenizer from ``tokenizer.json`` with
   the ``tokenizers`` library and encode each batch exactly as ``encode_batch`` would,
   special tokens included (``<s> … </s>`` / ``[CLS] … [SEP]``, no truncation),
   single-threaded each (``TOKENIZERS_PARALLELISM=false``); a cache of space-separated
   pieces (:class:`mlmtool.data.piece_encoder.PieceEncoder`) makes that 2-3x cheaper than plain
   ``encode_batch`` (the pool: :mod:`mlmtool.data.encode_pool`).
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
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from mlmtool.data import blocks, encode_pool, shard_plan, shards
from mlmtool.data.blocks import VALIDATION_RULE
from mlmtool.constants import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_VALIDATION_SPLIT_PERCENTAGE, EXECUTORS, choice_error
from mlmtool.data.corpus import DEFAULT_BATCH_BYTES, Corpus
from mlmtool.data.encode_pool import Job, encoded_batches, tasks
from mlmtool.errors import ConfigError, DataError
from mlmtool.modeldir import ModelDir, atomic_write_json, file_sha256, remove_leftovers
from mlmtool.data.piece_encoder import PieceEncoder
from mlmtool.data.tokenizer_facts import TokenizerInfo, retrain_hint, tokenizer_info


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
        "num_shards": meta.get("num_shards", 1),
        "packing_loss_blocks": meta.get("packing_loss_blocks"),
        "fingerprint": shards.fingerprint(meta),
    }


def prepare(model_dir: ModelDir | str | os.PathLike, corpus: Corpus, *,
            max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, line_by_line: bool = False,
            validation_split_percentage: float = DEFAULT_VALIDATION_SPLIT_PERCENTAGE,
            num_proc: int | None = None, force: bool = False,
            show_progress: bool = True, batch_bytes: int = DEFAULT_BATCH_BYTES,
            piece_cache: bool = True, num_shards: int = 1, shard_indices: list[int] | None = None,
            executor: str = "local", ray_address: str | None = None) -> dict[str, Any]:
    """Tokenize ``corpus`` into ``DIR/data`` (see the module doc); return a summary dict.

    ``status`` in the result is "written" or "up to date" (nothing done).  ``num_proc``
    defaults to the number of CPU cores; ``batch_bytes`` is the text per worker task (it
    changes speed only, never the output); ``piece_cache=False`` encodes every document
    with plain ``encode_batch`` (same output, slower: see :class:`PieceEncoder`).

    ``num_shards``: cut the corpus into that many shards (:mod:`mlmtool.data.shards`; the store
    depends only on the inputs and N); ``shard_indices``: prepare only those (several
    processes fill one store; the one that finds every shard done finishes it); None takes
    this process's share when the environment names several processes
    (:func:`mlmtool.data.shard_plan.process_share`), else all.  ``executor="ray"`` runs the shards as
    Ray tasks (``ray_address``: a running cluster; None starts a local one).
    """
    started = time.perf_counter()
    mdir = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    if not mdir.config_path.exists():
        mdir.read_config()  # raises "run 'mlmtool init DIR' first"
    mdir.require_tokenizer()
    config = mdir.read_config()  # without transformers when config.json is complete

    from mlmtool.presets import max_sequence_length

    limit = max_sequence_length(config)
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length must be at least 2, got {max_seq_length}",
                          "use e.g. --max-seq-length 128")
    if max_seq_length > limit:
        raise ConfigError(f"--max-seq-length {max_seq_length} exceeds the model's limit of {limit} "
                          f"positions (max_position_embeddings {config['max_position_embeddings']})",
                          _positions_hint(mdir, config, max_seq_length, limit))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_proc is not None and not 1 <= num_proc <= 4 * cores:
        raise ConfigError(f"--num-proc {num_proc} is not in 1 .. {4 * cores} (4 x the {cores} CPU cores)",
                          f"use --num-proc {cores}, or leave it out (one per core)")
    if not 0 <= validation_split_percentage < 100:
        raise ConfigError(f"--validation-split-percentage must be in [0, 100), got "
                          f"{validation_split_percentage}", "use e.g. 5 (or 0 for no validation)")

    if executor not in EXECUTORS:
        raise ConfigError(choice_error("--executor", executor, EXECUTORS), "use --executor local or ray")
    shard_indices = shard_plan.check_indices(shard_indices, num_shards)
    if shard_indices is None and executor == "local":
        shard_indices = shard_plan.process_share(num_shards)
    args = {"max_seq_length": max_seq_length, "line_by_line": line_by_line,
            "validation_split_percentage": float(validation_split_percentage)}
    if num_shards > 1:  # one shard is the store of one stream, as before shards: its key is unchanged
        args["num_shards"] = num_shards
    key = _key(corpus, file_sha256(mdir.tokenizer_path), config, args)
    if not force:  # checked before loading the tokenizer: this path must stay fast
        meta = _up_to_date(mdir.data_dir, key)
        if meta is not None:
            return _summary(meta, mdir.data_dir, "up to date", time.perf_counter() - started, None)

    tok = tokenizer_info(mdir)
    # vocab_size may exceed the tokenizer (a padded embedding matrix, as resize_token_embeddings(
    # pad_to_multiple_of=64) writes or ModernBERT's 50,368): the ids past it never occur in the
    # data, masking never draws them and predict never returns them.  The meta records the
    # tokenizer's size (vocab_size) and the model's (model_vocab_size).
    if tok.vocab_size > config["vocab_size"]:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size "
                          f"is {config['vocab_size']}",
                          retrain_hint(mdir, "the tokenizer", " (it updates config.json)"))
    if tok.pad_token_id != config["pad_token_id"]:
        raise ConfigError(f"config.json pad_token_id {config['pad_token_id']} differs from the "
                          f"tokenizer's {tok.pad_token_id}",
                          retrain_hint(mdir, "the tokenizer", " (it updates config.json)"))
    key["tokenizer_sha256"] = tok.sha256  # the same file, unless it changed meanwhile
    plain = shard_indices is None  # all shards: holds the directory's lock throughout, as before shards
    with mdir.lock("prepare", enabled=plain):
        if plain:
            remove_leftovers(mdir.data_dir)  # the .data.*.tmp of a killed run
        result = _build(mdir, corpus, tok, key, args, started=started, num_proc=num_proc,
                        show_progress=show_progress, batch_bytes=batch_bytes, piece_cache=piece_cache,
                        num_shards=num_shards, shard_indices=shard_indices, plain=plain, force=force,
                        executor=executor, ray_address=ray_address)
    if line_by_line:
        from tokenizers import Tokenizer

        frame = len(Tokenizer.from_file(tok.path).encode("", add_special_tokens=True).ids)
        if max_seq_length <= frame:  # every block is <s> </s>: train and eval refuse to score nothing
            result["warnings"] = [f"--line-by-line blocks of {max_seq_length} tokens hold only the {frame} special "
                                  "tokens around each document, no token to predict (train and eval refuse them): "
                                  f"prepare again with --max-seq-length {frame + 1} or more (e.g. 128) and --force"]
    return result


def _positions_hint(mdir: ModelDir, config: dict, max_seq_length: int, limit: int) -> str:
    """How to prepare blocks longer than the model's positions, by what DIR holds: weights
    whose position table cannot grow (imported by ``init --from`` or trained) leave only
    shorter blocks; a rotary model's positions are no weights, so ``init --from`` again with
    more of them works; a DIR with no weights yet gets its own config with more positions."""
    from mlmtool.presets import parameter_count

    shorter = f"use --max-seq-length {limit} or less"
    grown = config["max_position_embeddings"] + max_seq_length - limit
    learned = parameter_count({**config, "max_position_embeddings": grown}) != parameter_count(config)
    option = f"--set max_position_embeddings={grown} --force"
    trained = mdir.trained_state()
    if trained:
        return f"{shorter} (the {' and '.join(trained)} in {mdir.path} were trained with these positions)"
    if mdir.init_weights_path.exists():
        source = mdir.init_source()
        if learned or source is None:
            return (f"{shorter}: the weights of {source or mdir.init_weights_path} have a table of "
                    f"{config['max_position_embeddings']} positions that cannot grow")
        return f"{shorter}, or import more positions with 'mlmtool init {mdir.path} --from {source} {option}'"
    return (f"{shorter}, or give the model more positions with "
            f"'mlmtool init {mdir.path} --from-config {mdir.config_path} {option}'")


def _build(mdir: ModelDir, corpus: Corpus, tok: TokenizerInfo, key: dict, args: dict, *,
           started: float, num_proc: int | None, show_progress: bool, batch_bytes: int,
           piece_cache: bool, num_shards: int, shard_indices: list[int] | None, plain: bool,
           force: bool, executor: str, ray_address: str | None) -> dict[str, Any]:
    """Tokenize the shards this process takes into the staging directory (mlmtool.data.shards);
    once every shard is done, write meta.json and swap the store in as DIR/data."""
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
    if corpus.hub is not None and num_shards > 1:
        raise ConfigError("--num-shards needs corpus files (local or URLs), not --dataset",
                          "pass the dataset's files (e.g. hf://datasets/NAME/...) instead of --dataset")
    staging = shards.open_staging(mdir.data_dir, key, num_shards, reset=plain and force)
    if not force and not plain and _up_to_date(mdir.data_dir, key) is not None:  # finished meanwhile by another
        shards.discard_if_empty(staging, num_shards)
        return _summary(blocks.read_meta(mdir.data_dir), mdir.data_dir, "up to date",
                        time.perf_counter() - started, None)
    pieces = shard_plan.cut(corpus.sources, num_shards) if corpus.hub is None else [[]]
    indices = list(range(num_shards)) if shard_indices is None else shard_indices
    if force and not plain:  # --force --shard-index I: redo those shards (a plain --force redoes all, above)
        for k in indices:
            (staging / shards.ledger_file(k, num_shards)).unlink(missing_ok=True)
    try:
        if executor == "ray":
            from mlmtool.data.ray_executor import run_shards

            run_shards(staging, pieces, indices, job, text_column=corpus.text_column, split=corpus.split,
                       batch_bytes=batch_bytes, address=ray_address)
        elif corpus.hub is not None:
            _build_hub(staging, corpus, job, num_proc=num_proc, batch_bytes=batch_bytes,
                       show_progress=show_progress)
        else:
            _build_shards(staging, corpus, pieces, indices, job, num_proc=num_proc, batch_bytes=batch_bytes,
                          show_progress=show_progress, wait=plain)
    except BaseException:
        shards.discard_if_empty(staging, num_shards)
        raise
    entries = shards.done_shards(staging, num_shards, job)
    mine = [entries[k] for k in indices if entries[k] is not None]
    if any(e is None for e in entries):
        done = sum(e is not None for e in entries)
        combined = shards.combine(mine)
        return {"status": "shards written", "data_dir": str(mdir.data_dir), "num_shards": num_shards,
                "shards_done": done, "shards_here": indices, "seq_len": max_seq_length,
                "num_blocks": combined["num_blocks"], "blocks": sum(combined["num_blocks"].values()),
                "seconds": round(time.perf_counter() - started, 3), "bytes": combined["bytes"],
                "parallelism": parallelism}
    combined = shards.combine(entries)
    seconds = time.perf_counter() - started
    meta = _block_meta(combined, tok, key, args, corpus=corpus, dtype=dtype, num_proc=num_proc,
                       parallelism=parallelism, seconds=seconds)
    meta["data_fingerprint"] = shards.fingerprint(meta)
    corpus.stats.skipped_lines = dict(combined["skipped_lines"])  # for corpus.warnings()
    corpus.stats.bytes = combined["bytes"]
    corpus.stats.documents = sum(combined["documents"].values())
    try:
        if corpus.stats.documents == 0:
            corpus._raise_empty()
        _check_nonempty(combined, max_seq_length, job.percentage)
    except DataError:  # every shard done, and the store unusable: nothing to resume, nothing left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with (contextlib.nullcontext(True) if plain else shards.directory_lock_or_none(mdir)) as locked:
        if not locked:  # a plain prepare holds it: that one finishes the store
            return {"status": "shards written", "data_dir": str(mdir.data_dir), "num_shards": num_shards,
                    "shards_done": num_shards, "shards_here": indices, "seconds": round(seconds, 3)}
        if not shards.staging_dir(mdir.data_dir).exists():  # finished by another process meanwhile
            meta = blocks.read_meta(mdir.data_dir)
            return _summary(meta, mdir.data_dir, "up to date", seconds, num_proc)
        remove_leftovers(mdir.data_dir)
        atomic_write_json(staging / blocks.META, meta)
        shards.swap_in(staging, mdir.data_dir)
    result = _summary(meta, mdir.data_dir, "written", seconds, num_proc)
    mdir.record("prepare", args={**args, "text_column": corpus.text_column, "num_proc": num_proc},
                inputs=key["inputs"],
                outputs={k: meta[k] for k in ("num_blocks", "tokens", "documents", "seq_len", "dtype")}
                | {"tokenizer_sha256": tok.sha256, "fingerprint": shards.fingerprint(meta)})
    return result


def _build_shards(staging: Path, corpus: Corpus, pieces, indices, job: Job, *, num_proc: int, batch_bytes: int,
                  show_progress: bool, wait: bool) -> None:
    from mlmtool.runtime.progress import StageProgress

    total = sum((s.end if s.end is not None else s.size) - s.start for k in indices for s in pieces[k])
    progress = StageProgress("Tokenizing", total=total, unit=corpus.unit)

    def on_batch(adv: int, ndocs: int, tokens: int) -> None:
        if show_progress:
            progress.advance(adv, documents=ndocs, tokens=tokens)

    with (progress if show_progress else contextlib.nullcontext(progress)):
        shards.build(staging, pieces, indices, job, text_column=corpus.text_column, split=corpus.split,
                     num_proc=num_proc, batch_bytes=batch_bytes, wait=wait, on_batch=on_batch)


def _build_hub(staging: Path, corpus: Corpus, job: Job, *, num_proc: int, batch_bytes: int,
               show_progress: bool) -> None:
    """A hub dataset: one shard, read through datasets (its own order)."""
    from mlmtool.runtime import lock
    from mlmtool.runtime.progress import StageProgress

    digest = shards._read_json(staging / shards.PLAN)["key_digest"]
    with lock.hold(staging, "prepare (shard 0 of 1)", name=shards._lock_name(0)):
        shard = shards._Shard(staging, 0, 1, job, digest, lambda: None)
        shard.corpus = corpus
        progress = StageProgress("Tokenizing", total=corpus.total, unit=corpus.unit)
        try:
            with (progress if show_progress else contextlib.nullcontext(progress)):
                for adv, ndocs, out in encoded_batches(tasks(corpus, batch_bytes), job, num_proc):
                    tokens = shard.add(out, job.line_by_line)
                    if show_progress:
                        progress.advance(adv, documents=ndocs, tokens=tokens)
        except BaseException:
            shard.abort()
            raise
        shard.commit()


def _block_meta(combined: dict, tok: TokenizerInfo, key: dict, args: dict, *, corpus: Corpus, dtype: np.dtype,
                num_proc: int, parallelism: str, seconds: float) -> dict[str, Any]:
    """The block store's meta.json (its fields are documented in :mod:`mlmtool.data.blocks`)."""
    return {
        "format": blocks.FORMAT,
        "version": blocks.VERSION,
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "seq_len": args["max_seq_length"],
        "line_by_line": args["line_by_line"],
        "document_starts": combined["document_starts"] and not args["line_by_line"],
        "splits": list(blocks.SPLITS),
        "files": {s: blocks.split_file(s) for s in blocks.SPLITS} if len(combined["shards"]) == 1
        else combined["shards"][0]["files"],
        "num_blocks": combined["num_blocks"],
        "tokens": combined["tokens"],
        "documents": combined["documents"],
        "dropped_tokens": combined["dropped_tokens"],
        "num_shards": len(combined["shards"]),
        # blocks that the shards' remainders (each < seq_len, dropped per shard) would have made in one
        # stream: floor(sum of remainders / seq_len) per split, at most num_shards - 1
        "packing_loss_blocks": {s: combined["remainder_dropped"][s] // args["max_seq_length"] for s in blocks.SPLITS},
        "shards": combined["shards"],  # the ledger: each shard's files, blocks and sha256 (mlmtool.data.shards)
        "pad_token_id": tok.pad_token_id,
        "mask_token_id": tok.mask_token_id,
        "unk_token_id": tok.unk_token_id,
        "cls_token_id": tok.cls_token_id,
        "sep_token_id": tok.sep_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "special_token_ids": list(tok.special_token_ids),
        "vocab_size": tok.vocab_size,
        "model_vocab_size": key["config"]["vocab_size"],  # >= vocab_size: a padded embedding
        "validation_split_percentage": args["validation_split_percentage"],
        "validation_rule": VALIDATION_RULE,
        "fingerprint": key["inputs"],
        "tokenizer_sha256": tok.sha256,
        "key": key,
        "bytes": combined["bytes"],
        "skipped_lines": sum(combined["skipped_lines"].values()),
        "num_proc": num_proc,
        "parallelism": parallelism,
        "seconds": round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_nonempty(combined: dict, seq_len: int, percentage: float) -> None:
    nb, docs, toks = combined["num_blocks"], combined["documents"], combined["tokens"]
    if sum(docs.values()) == 0:
        raise DataError("the corpus has no documents: it holds only empty or whitespace-only text",
                        "pass text with one document per line")
    if nb["train"] == 0:
        raise DataError(f"the corpus is too small: its training split has {toks['train']:,} tokens "
                        f"({docs['train']:,} documents), not one block of {seq_len}",
                        "add text or lower --max-seq-length")
    if percentage > 0 and nb["validation"] == 0:
        total_docs = docs["train"] + docs["validation"]
        raise DataError(f"the validation split ({percentage:g}% of {total_docs:,} documents = "
                        f"{docs['validation']:,} documents, {toks['validation']:,} tokens) holds no block of "
                        f"{seq_len} tokens",
                        "add text, lower --max-seq-length, or change "
                        "--validation-split-percentage (0 for no validation split)")


__all__ = ["prepare", "DEFAULT_MAX_SEQ_LENGTH", "DEFAULT_VALIDATION_SPLIT_PERCENTAGE",
           "VALIDATION_RULE"]
