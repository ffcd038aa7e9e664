"""``prepare --executor ray``: one Ray task per shard (:mod:`mlmtool.data.shards`), on a running
cluster (``--ray-address``) or a local one started here and shut down after.

Each task builds its shard exactly as a local process would (the same cut, per-shard lock,
temporary files, ledger entry), so the store is the same whichever executor made it; the
workers must see the staging directory (shared storage) and the inputs (the same paths, or
URLs).  A task that dies (its worker killed, a node lost) is retried by Ray; its shard,
never committed, is redone.  Workers run with ``JAX_PLATFORMS=cpu`` (a tokenizing task has
no use for an accelerator) and single-threaded tokenizers; ``ray`` is imported only here
(``pip install 'mlmtool[ray]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mlmtool.errors import ConfigError, MlmtoolError


def _shard_task(staging: str, pieces: list, k: int, job, text_column: str, split: str, batch_bytes: int) -> int:
    from mlmtool.data import shards

    shards.build(Path(staging), pieces, [k], job, text_column=text_column, split=split, num_proc=1,
                 batch_bytes=batch_bytes, wait=False)
    return k


def worker_env() -> dict[str, str]:
    """The workers' environment: this mlmtool first on the path, CPU-only JAX, one tokenizer thread."""
    import mlmtool

    root = str(Path(mlmtool.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}


def run_shards(staging: Path, pieces: list[list], indices: Sequence[int], job, *, text_column: str, split: str,
               batch_bytes: int, address: str | None = None) -> list[int]:
    """Run the shards ``indices`` as Ray tasks and wait for them; the shards built."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs the ray package", "pip install 'mlmtool[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, runtime_env={"env_vars": worker_env()}, include_dashboard=False,
                     logging_level="warning", log_to_driver=False)
        except Exception as e:  # no cluster at that address, a bad address
            raise ConfigError(f"cannot join the Ray cluster{' at ' + address if address else ''} "
                              f"({e.__class__.__name__}: {e})",
                              "check --ray-address (e.g. ray://HEAD:10001), or leave it out for a local "
                              "cluster") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_shard_task)
        n = len(pieces)
        refs = []
        for k in indices:
            mine = [[] for _ in range(n)]
            mine[k] = pieces[k]
            refs.append(task.options(runtime_env={"env_vars": worker_env()}).remote(
                str(staging), mine, k, job, text_column, split, batch_bytes))
        try:
            return list(ray.get(refs))
        except Exception as e:  # a task's own error (a bad input): raise it as it is, not Ray's wrapper
            cause = getattr(e, "cause", None)
            if isinstance(cause, MlmtoolError):
                raise cause from None
            raise
    finally:
        if started:
            ray.shutdown()
