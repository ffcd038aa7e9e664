"""A sharded, resumable block store: ``prepare --num-shards N`` and the processes that fill it.

Which bytes each shard holds, how its documents are split, and which shards a process takes:
:mod:`mlmtool.data.shard_plan`.  This module writes and reads the store.

Layout, in ``DIR/data`` (N = 1: ``train.bin`` / ``validation.bin``, the layout of one
stream)::

    train-00003-of-00008.bin, validation-00003-of-00008.bin   shard 3's blocks
    train-00003-of-00008.starts.bin, ...                      where their documents start
    shard-00003-of-00008.json                                 shard 3's ledger entry
    meta.json                                                 the store, written last

While it is filled the store lives in ``DIR/.data.shards`` (:func:`staging_dir`), where
``plan.json`` records what it is for (the key of ``prepare``: inputs, tokenizer, options,
N).  A shard's files are written under temporary names, renamed, then its ledger entry is
written atomically: a shard with a ledger entry is done; one without is redone from
scratch, its half-written files never read.  Each shard is built under its own lock
(``.shard-00003.lock``, :mod:`mlmtool.runtime.lock`), so processes on any number of hosts fill one
store on shared storage at once, each skipping shards done or being done by another.
When every shard is done, one process (under the directory's lock) writes ``meta.json``
and swaps the staging directory in as ``DIR/data``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mlmtool.data import blocks
from mlmtool.data.corpus import DEFAULT_BATCH_DOCUMENTS, Corpus, Source
from mlmtool.data.encode_pool import Job, encoded_batches
from mlmtool.errors import DataError, ModelDirError
from mlmtool.modeldir import atomic_write_json
from mlmtool.data.shard_plan import phase

PLAN = "plan.json"


# -- names ------------------------------------------------------------------------------------

def staging_dir(data_dir: Path) -> Path:
    return Path(data_dir).with_name(f".{Path(data_dir).name}.shards")


def shard_file(split: str, k: int, n: int) -> str:
    return blocks.split_file(split) if n == 1 else f"{split}-{k:05d}-of-{n:05d}.bin"


def ledger_file(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.json"


def _lock_name(k: int) -> str:
    return f".shard-{k:05d}.lock"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]




# -- the staging directory and its ledger -----------------------------------------------------

def open_staging(data_dir: Path, key: dict, num_shards: int, *, reset: bool = False) -> Path:
    """The staging directory for ``key`` (made, or reset when it was for another key and no
    process is filling it)."""
    staging = staging_dir(data_dir)
    plan = {"key_digest": key_digest(key), "num_shards": num_shards, "key": key}
    current = _read_json(staging / PLAN)
    if staging.is_dir() and (reset or current is None or current.get("key_digest") != plan["key_digest"]):
        busy = [k for k in range(int((current or {}).get("num_shards") or 0)) if _locked(staging, k)]
        if busy:
            raise ModelDirError(f"{staging} is being filled by another prepare (shard {busy[0]} is locked) "
                                "with other inputs or options",
                                "wait for it to finish or stop it, or give the same inputs and options")
        shutil.rmtree(staging, ignore_errors=True)
        current = None
    staging.mkdir(parents=True, exist_ok=True)
    if current is None:
        atomic_write_json(staging / PLAN, plan)
    return staging


def _read_json(path: Path) -> dict | None:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _locked(staging: Path, k: int) -> bool:
    from mlmtool.runtime import lock

    try:
        with lock.hold(staging, "prepare (probe)", name=_lock_name(k)):
            return False
    except ModelDirError:
        return True


def read_ledger(staging: Path, k: int, n: int, digest: str, seq_len: int, itemsize: int) -> dict | None:
    """Shard k's ledger entry if the shard is done (its files present, of the sizes it says)."""
    entry = _read_json(staging / ledger_file(k, n))
    if entry is None or entry.get("key_digest") != digest:
        return None
    try:
        for split in blocks.SPLITS:
            path = staging / entry["files"][split]
            if path.stat().st_size != int(entry["num_blocks"][split]) * seq_len * itemsize:
                return None
            starts = path.with_name(blocks.starts_file(path.name))  # where its documents start, if recorded
            if entry.get("document_starts") and starts.stat().st_size != int(
                    entry["num_blocks"][split]) * blocks.starts_row_bytes(seq_len):
                return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return entry


# -- building shards --------------------------------------------------------------------------

class _Shard:
    """One shard being written: its split writers (temporary names), counts, and lock."""

    def __init__(self, staging: Path, k: int, n: int, job: Job, digest: str, release: Callable[[], None]):
        self.staging, self.k, self.n, self.digest, self.release = staging, k, n, digest, release
        dtype = np.dtype(job.dtype)
        self.starts = not job.line_by_line  # concatenated blocks record where documents start
        self.writers = {s: blocks.SplitWriter(
            staging / f".{shard_file(s, k, n)}.tmp", job.seq_len, dtype,
            starts_path=staging / f".{blocks.starts_file(shard_file(s, k, n))}.tmp" if self.starts else None)
            for s in blocks.SPLITS}
        self.counts = {s: {"documents": 0, "tokens": 0, "truncated": 0} for s in blocks.SPLITS}
        self.corpus: Corpus | None = None

    def add(self, out: dict, line_by_line: bool) -> int:
        tokens = 0
        for split, part in out.items():
            c = self.counts[split]
            for name in c:
                c[name] += part[name]
            tokens += part["tokens"]
            if line_by_line:
                self.writers[split].add_blocks(part["data"])
            else:
                self.writers[split].add_stream(part["data"], part["lengths"])
        return tokens

    def commit(self) -> dict:
        """Close and rename the files, then write the ledger entry: the shard is done."""
        for w in self.writers.values():
            w.close()
        files = {}
        for split, w in self.writers.items():
            files[split] = shard_file(split, self.k, self.n)
            os.replace(w.path, self.staging / files[split])
            if w.starts_path is not None:
                os.replace(w.starts_path, self.staging / blocks.starts_file(files[split]))
        stats = self.corpus.stats if self.corpus is not None else None
        entry = {
            "index": self.k, "num_shards": self.n, "key_digest": self.digest, "files": files,
            "num_blocks": {s: w.num_blocks for s, w in self.writers.items()},
            "tokens": {s: self.counts[s]["tokens"] for s in blocks.SPLITS},
            "documents": {s: self.counts[s]["documents"] for s in blocks.SPLITS},
            "dropped_tokens": {s: self.writers[s].dropped_tokens + self.counts[s]["truncated"]
                               for s in blocks.SPLITS},
            "remainder_dropped": {s: self.writers[s].dropped_tokens for s in blocks.SPLITS},
            "sha256": {s: w.sha256 for s, w in self.writers.items()},
            "document_starts": self.starts,
            "bytes": stats.bytes if stats else 0,
            "skipped_lines": stats.skipped_lines if stats else {},
        }
        atomic_write_json(self.staging / ledger_file(self.k, self.n), entry)
        self.release()
        return entry

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
            w.path.unlink(missing_ok=True)
            if w.starts_path is not None:
                w.starts_path.unlink(missing_ok=True)
        self.release()


def build(staging: Path, pieces: list[list[Source]], indices: Sequence[int], job: Job, *, text_column: str,
          split: str, num_proc: int, batch_bytes: int, wait: bool, on_batch: Callable | None = None,
          on_wait: Callable | None = None) -> list[int]:
    """Build the shards ``indices`` that are not done yet, all through one pool of workers;
    skip those another process holds (``wait``: then wait for them, and build any it left
    undone).  Returns the shards built here."""
    from mlmtool.runtime import lock

    n = len(pieces)
    digest = _read_json(staging / PLAN)["key_digest"]
    itemsize = np.dtype(job.dtype).itemsize
    built: list[int] = []

    def done(k: int) -> bool:
        return read_ledger(staging, k, n, digest, job.seq_len, itemsize) is not None

    todo = [k for k in indices if not done(k)]
    while todo:
        owners: deque = deque()
        open_shards: dict[int, _Shard] = {}
        busy: list[int] = []

        def claim(k: int) -> _Shard | None:
            cm = lock.hold(staging, f"prepare (shard {k} of {n})", name=_lock_name(k))
            try:
                cm.__enter__()
            except ModelDirError:
                busy.append(k)
                return None
            if done(k):  # finished by another process meanwhile
                cm.__exit__(None, None, None)
                return None
            return _Shard(staging, k, n, job, digest, lambda: cm.__exit__(None, None, None))

        def tasks() -> Iterator[tuple[int, list[str], int]]:
            for k in todo:
                shard = claim(k)
                if shard is None:
                    continue
                open_shards[k] = shard
                shard.corpus = Corpus(list(pieces[k]), text_column=text_column, split=split)
                start = phase(k, n, job.percentage)
                for batch in shard.corpus.batches(batch_bytes, DEFAULT_BATCH_DOCUMENTS, allow_empty=True):
                    owners.append(k)
                    yield start, batch.documents, batch.progress
                    start += len(batch.documents)
                owners.append(("end", k))  # its results are all in when this one's comes back
                yield start, [], 0

        try:
            for adv, ndocs, out in encoded_batches(tasks(), job, num_proc):
                owner = owners.popleft()
                if isinstance(owner, tuple):
                    open_shards.pop(owner[1]).commit()
                    built.append(owner[1])
                    continue
                tokens = open_shards[owner].add(out, job.line_by_line)
                if on_batch is not None:
                    on_batch(adv, ndocs, tokens)
        finally:
            for shard in open_shards.values():
                shard.abort()
        todo = [k for k in indices if not done(k)]
        if todo and not wait:
            break
        if todo and not busy:  # pragma: no cover - a shard written here that does not check
            raise DataError(f"shard {todo[0]} of {staging} was written but its ledger entry does not check",
                            "prepare again with --force")
        if todo:
            if on_wait is not None:
                on_wait(todo)
            time.sleep(1.0)
    return built


def discard_if_empty(staging: Path, num_shards: int) -> None:
    """Remove the staging directory after a failure if it holds no done shard and no process
    is filling it (a failed prepare leaves nothing behind; done shards are kept to resume)."""
    if not staging.is_dir() or any(staging.glob("shard-*-of-*.json")):
        return
    if any(_locked(staging, k) for k in range(num_shards)):
        return
    shutil.rmtree(staging, ignore_errors=True)


def done_shards(staging: Path, num_shards: int, job: Job) -> list[dict | None]:
    digest = (_read_json(staging / PLAN) or {}).get("key_digest")
    itemsize = np.dtype(job.dtype).itemsize
    return [read_ledger(staging, k, num_shards, digest, job.seq_len, itemsize) for k in range(num_shards)]


# -- finishing, fingerprint, verify -----------------------------------------------------------

def combine(entries: list[dict]) -> dict[str, Any]:
    """The store's totals and ``shards`` list (for meta.json) from the shards' ledger entries."""
    out: dict[str, Any] = {}
    for field in ("num_blocks", "tokens", "documents", "dropped_tokens"):
        out[field] = {s: sum(int(e[field][s]) for e in entries) for s in blocks.SPLITS}
    out["bytes"] = sum(int(e.get("bytes") or 0) for e in entries)
    skipped: dict[str, int] = {}
    for e in entries:
        for name, c in (e.get("skipped_lines") or {}).items():
            skipped[name] = skipped.get(name, 0) + int(c)
    out["skipped_lines"] = skipped
    out["shards"] = [{"files": e["files"], "num_blocks": e["num_blocks"], "sha256": e["sha256"],
                      "documents": e["documents"]} for e in entries]
    out["document_starts"] = all(e.get("document_starts") for e in entries)  # every shard recorded them
    out["remainder_dropped"] = {s: sum(int(e.get("remainder_dropped", {}).get(s, 0)) for e in entries)
                                for s in blocks.SPLITS}
    return out


def fingerprint(meta: dict) -> dict | None:
    """``data.fingerprint``: per split, the sha256 of its shards' sha256s (hex, one per line),
    and the blocks; equal fingerprints, the same blocks in the same order."""
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        return None
    try:
        out: dict[str, Any] = {s: hashlib.sha256("\n".join(sh["sha256"][s] for sh in shards).encode()).hexdigest()
                               for s in blocks.SPLITS}
    except (KeyError, TypeError):
        return None
    out["num_blocks"] = meta.get("num_blocks")
    out["num_shards"] = len(shards)
    out["seq_len"] = meta.get("seq_len")
    return out


def swap_in(staging: Path, data_dir: Path) -> None:
    """Replace ``data_dir`` by the finished staging directory (directory lock held)."""
    old = None
    if data_dir.exists():
        old = data_dir.with_name(f".{data_dir.name}.old.{os.getpid()}")
        os.replace(data_dir, old)
    os.replace(staging, data_dir)
    (data_dir / PLAN).unlink(missing_ok=True)
    for p in data_dir.glob(".shard-*.lock"):
        p.unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def verify(data_dir: Path) -> dict[str, Any]:
    """Re-read every shard file of a finished store against its ledger (sizes and sha256)."""
    meta = blocks.read_meta(data_dir)
    shards = meta.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{data_dir} records no shard digests (prepared by an older mlmtool)",
                        "prepare it again with --force to verify it later")
    checked = 0
    for k, sh in enumerate(shards):
        for split in blocks.SPLITS:
            path = data_dir / sh["files"][split]
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                        checked += len(chunk)
            except OSError as e:
                raise DataError(f"shard {k}: cannot read {path} ({e.strerror})", "prepare again with --force") from None
            if h.hexdigest() != sh["sha256"][split]:
                raise DataError(f"shard {k}: {path} does not match its ledger (sha256 differs): the store is damaged",
                                "prepare again with --force")
    for split in blocks.SPLITS:
        blocks.BlockStore.open(data_dir, split)  # sizes against meta.json
    return {"status": "verified", "data_dir": str(data_dir), "shards": len(shards), "bytes_read": checked,
            "fingerprint": fingerprint(meta)}


@contextlib.contextmanager
def directory_lock_or_none(mdir) -> Iterator[bool]:
    """The directory's lock if free (True), else nothing (False): another process finishes."""
    try:
        cm = mdir.lock("prepare")
        cm.__enter__()
    except ModelDirError:
        yield False
        return
    try:
        yield True
    finally:
        cm.__exit__(None, None, None)
