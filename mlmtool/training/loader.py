"""The training batches: step -> (epoch, position) -> a seeded per-epoch permutation of the
blocks, so the data order is a pure function of the step (exact resume, no loader state to
save).  Each process reads only its rows; a thread prefetches the next batches."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np

from mlmtool.runtime import sharding as sh

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a seeded permutation, the same on every process."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchLoader:
    """Host-side batches for steps ``start..stop``, prefetched on a thread.

    The global batch of step ``s`` is rows ``perm_e[p*G:(p+1)*G]`` of the train split,
    with ``e, p = divmod(s, steps_per_epoch)``: the position in the data is a function of
    the step, so resuming needs nothing but the step.  Each process reads only the rows
    its devices hold, and the global array is assembled from the processes' pieces.
    With ``documents`` a batch is the pair (ids, document starts), both [A, B, L]
    (``BlockStore.read_documents``, for document attention).
    """

    def __init__(self, store, *, accum: int, micro_batch: int, seed: int, steps_per_epoch: int,
                 sharding, start: int, stop: int, prefetch: int = 2, documents: bool = False):
        self.store = store
        self.accum = accum
        self.micro_batch = micro_batch
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.sharding = sharding
        self.documents = documents
        self.global_shape = (accum, micro_batch, store.seq_len)
        self.rows = sh.process_rows(sharding, self.global_shape, row_axis=1)
        self.start, self.stop = start, stop
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def host_batch(self, step: int):
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(len(self.store), self.seed, epoch)
            self._perm_epoch = epoch
        per_step = self.accum * self.micro_batch
        idx = self._perm[pos * per_step:(pos + 1) * per_step].reshape(self.accum, self.micro_batch)  # [A, B]
        local = idx[:, self.rows].reshape(-1)  # [A * B_local]: only this process's rows
        shape = (self.accum, len(self.rows), self.store.seq_len)
        if self.documents:
            ids, starts = self.store.read_documents(local)
            return ids.reshape(shape), starts.reshape(shape)
        return self.store.read(local).reshape(shape)

    def _work(self) -> None:
        try:
            for step in range(self.start, self.stop):
                if self._stop.is_set():
                    return
                batch = jax.tree_util.tree_map(lambda x: sh.global_array(x, self.sharding, self.global_shape),
                                               self.host_batch(step))
                while not self._stop.is_set():
                    try:
                        self._queue.put((step, batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the consumer
            self._queue.put((None, e))

    def __iter__(self) -> Iterator[tuple[int, jax.Array]]:
        self._thread = threading.Thread(target=self._work, name="mlmtool-prefetch", daemon=True)
        self._thread.start()
        for _ in range(self.start, self.stop):
            step, batch = self._queue.get()
            if step is None:
                raise batch
            yield step, batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
