"""Planning a sharded store: which bytes of the inputs each shard holds (the cut), where
its documents start in the validation rule, and which shards a process takes.

The cut (:func:`cut`): the inputs, in corpus order, are laid end to end as one range of
bytes of total size T, and shard k is the bytes ``[k*T//N, (k+1)*T//N)``.  An uncompressed
``.txt``/``.jsonl`` file is cut at those offsets, at line boundaries: a piece owns the lines
that *start* in its range (:class:`~mlmtool.data.corpus.streams.Opened` reads them); any other file
(compressed, csv, parquet, a saved dataset) goes whole to the shard its first byte falls in.
The cut depends only on the inputs' order and sizes and N, never on who reads them or
from where (a local disk or ``s3://``).

Each shard is tokenized, packed and split on its own: its documents are numbered from 0 in
its own order, and document i of shard k goes to validation by the systematic rule
(:func:`mlmtool.data.blocks.validation_mask`) at position ``phase(k) + i``, where
``phase(k) = k * period // N`` spreads the shards' first held-out documents over one
period (``100 / p`` documents) so that small shards still hold their share.  Shard 0's
phase is 0: with N = 1 the store is exactly today's single stream.  Packing per shard drops
each shard's final remainder: fewer than one block per shard and split against one stream.

The store these shards make: :mod:`mlmtool.data.shards`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mlmtool.data import blocks
from mlmtool.data.corpus import Source
from mlmtool.errors import ConfigError

MAX_SHARDS = 100_000


# -- the cut --------------------------------------------------------------------------------

def cut(sources: Sequence[Source], num_shards: int) -> list[list[Source]]:
    """Each shard's pieces of the inputs (see the module doc)."""
    total = sum(s.size for s in sources)
    bounds = [k * total // num_shards for k in range(num_shards + 1)]
    shards: list[list[Source]] = [[] for _ in range(num_shards)]
    offset = 0
    for src in sources:
        lo, hi = offset, offset + src.size
        offset = hi
        if not src.splittable:
            k = min(num_shards - 1, int(np.searchsorted(bounds, lo, side="right")) - 1)
            shards[k].append(src)
            continue
        for k in range(num_shards):
            a, b = max(lo, bounds[k]), min(hi, bounds[k + 1])
            if a < b:
                shards[k].append(src if (a, b) == (lo, hi) else src.piece(a - lo, b - lo))
    return shards


def phase(shard: int, num_shards: int, percentage: float) -> int:
    """Where shard ``shard``'s documents start in the systematic validation rule."""
    q = blocks._ppm(percentage)
    if not q or num_shards <= 1:
        return 0
    period = max(1, round(blocks._PPM / q))
    return shard * period // num_shards


# -- which shards, for this process -----------------------------------------------------------

def check_indices(indices: Sequence[int] | None, num_shards: int) -> list[int] | None:
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ConfigError(f"--num-shards {num_shards} is not in 1 .. {MAX_SHARDS:,}", "use e.g. --num-shards 64")
    if indices is None:
        return None
    bad = [i for i in indices if not 0 <= i < num_shards]
    if bad:
        raise ConfigError(f"--shard-index {bad[0]} is not in 0 .. {num_shards - 1} (--num-shards {num_shards})",
                          f"give shard indices below {num_shards}")
    return sorted(set(indices))


def process_share(num_shards: int, environ=os.environ) -> list[int] | None:
    """This process's shards when it is one of several: ``MLMTOOL_NUM_PROCESSES`` /
    ``MLMTOOL_PROCESS_ID`` (the variables ``train`` joins ``jax.distributed`` with), else a
    SLURM step's tasks (``SLURM_NTASKS`` / ``SLURM_PROCID``) or a SLURM job array
    (``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_ID``); shard k goes to process k mod P.
    ``TPU_WORKER_HOSTNAMES`` / ``TPU_WORKER_ID`` (TPU pods on GKE) come last.
    None when this is the only process."""
    for count, index, base in (("MLMTOOL_NUM_PROCESSES", "MLMTOOL_PROCESS_ID", None),
                               ("SLURM_NTASKS", "SLURM_PROCID", None),
                               ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")):
        try:
            p = int(environ.get(count) or 1)
            i = int(environ.get(index) or 0) - int(environ.get(base) or 0 if base else 0)
        except ValueError:
            raise ConfigError(f"{count}={environ.get(count)!r} / {index}={environ.get(index)!r} are not integers",
                              "unset them, or give --shard-index") from None
        if p > 1:
            if not 0 <= i < p:  # pragma: no cover - a broken environment
                raise ConfigError(f"{index}={i} is not in 0 .. {p - 1} ({count}={p})", "check the environment")
            return list(range(i, num_shards, p))
    hosts = [h for h in (environ.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h]
    if len(hosts) > 1 and (environ.get("TPU_WORKER_ID") or "").isdigit():
        return list(range(int(environ["TPU_WORKER_ID"]), num_shards, len(hosts)))
    return None
