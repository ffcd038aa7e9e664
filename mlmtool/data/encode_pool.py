"""The tokenizing workers of ``prepare``: batches of documents in, per split token arrays (or
line-by-line blocks) out, in corpus order whatever the number of processes.

``num_proc`` forked worker processes each load the tokenizer from ``tokenizer.json`` and encode
single-threaded (``TOKENIZERS_PARALLELISM=false``) through :class:`mlmtool.data.piece_encoder.PieceEncoder`,
with a bounded number of batches in flight (flat memory); where forking is unsafe (jax imported)
this process encodes with tokenizers' own threads instead.  A worker that dies raises DataError
instead of hanging the run; a worker whose parent was killed exits.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from mlmtool.data import blocks
from mlmtool.data.blocks import validation_mask
from mlmtool.data.corpus import Corpus
from mlmtool.errors import DataError
from mlmtool.data.piece_encoder import PieceEncoder

_IN_FLIGHT_PER_PROC = 3   # batches queued per worker: enough to keep them busy, bounded memory


@dataclass(frozen=True)
class Job:
    tokenizer_path: str
    seq_len: int
    line_by_line: bool
    percentage: float
    dtype: str
    pad_token_id: int
    piece_cache: bool = True


_worker: dict[str, Any] = {}


def _init_worker(job: Job, worker_process: bool = True) -> None:
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
    # Corpus text that looks like a special token ("<s>" in HTML, "<mask>" in ML papers) is
    # text: only the post-processor's framing makes special ids (a literal "<pad>" would be
    # masked out as padding; document starts are recorded beside the blocks, not read off the ids).
    tok.encode_special_tokens = True
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


def _encode_task(task: tuple[int, list[str], int]) -> tuple[int, int, dict[str, dict]]:
    """Worker: encode one batch; per split its tokens (or blocks) and counts."""
    start, docs, progress = task
    job: Job = _worker["job"]
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
            data, cut = blocks.document_blocks(ids, job.seq_len, job.pad_token_id, dtype)
            lengths = None
        else:
            data, lengths = enc.encode_stream(split_docs, dtype)  # lengths: where documents start
            tokens, cut = int(data.size), 0
        out[split] = {"data": data, "documents": len(split_docs), "tokens": tokens, "truncated": cut,
                      "lengths": lengths}
    return progress, len(docs), out


def tasks(corpus: Corpus, batch_bytes: int) -> Iterator[tuple[int, list[str], int]]:
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
    test that did gets the threaded fallback of :func:`encoded_batches`).
    """
    import multiprocessing

    return "jax" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()


def encoded_batches(tasks: Iterable, job: Job, num_proc: int) -> Iterator:
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
