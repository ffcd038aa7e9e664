"""A seeded, uniform random sample of a corpus's documents within a byte or document budget.

``mlmtool tokenizer --sample-bytes N`` (or ``--sample-documents N``) trains on such a sample
when the corpus is too big for the trainer's memory, as SentencePiece's
``input_sentence_size`` does: the vocabulary of a large enough uniform sample is, to the
trainer, the corpus's.

How, in one pass and bounded memory: every document gets an independent uniform random
key (numpy's PCG64 seeded with ``seed``, one key per document in corpus order), and the
sample is the documents with the smallest keys, taken in key order until their total
reaches the budget: a prefix of a uniformly random order of the documents.  Whether a
document is in it depends on the others' keys and sizes, never on its own size, so
every document has the same chance (exactly so for a document budget: a uniform
N-subset).  :class:`Reservoir` keeps that prefix while the corpus streams by, in a heap
ordered by key: a document enters only if its key is below the largest kept one, and the
largest leave while the rest still meet the budget.  It holds the budget plus one
document; a batch's keys are compared with the largest kept key in numpy, so the
documents that cannot enter cost no Python work.

The sample totals at least the budget (all of the corpus, if it is smaller) and less than
the budget plus its last document; a document budget gives exactly that many documents.
The same corpus, budget and seed give the same sample whatever the batch sizes, returned
in corpus order.

Not chosen: counting first, then keeping each document with probability N/total.  It
needs no memory for the sample, but reads the corpus twice and its size is random
(binomial), not within one document of the budget.
"""

from __future__ import annotations

import heapq
from typing import Any


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class Reservoir:
    """The documents with the smallest random keys whose total reaches the budget."""

    def __init__(self, *, max_bytes: int | None = None, max_documents: int | None = None, seed: int = 0):
        if (max_bytes is None) == (max_documents is None):
            raise ValueError("give max_bytes or max_documents")
        budget = max_bytes if max_bytes is not None else max_documents
        if budget < 1:
            raise ValueError(f"the sample's budget must be positive, got {budget}")
        import numpy as np

        self._np = np
        self._rng = np.random.default_rng(seed)
        self.seed = seed
        self.max_bytes, self.max_documents = max_bytes, max_documents
        self._budget = budget
        self._by_bytes = max_bytes is not None
        self._heap: list[tuple[float, int, str, int]] = []  # (-key, index in corpus, document, its size)
        self._kept = 0      # total size kept: bytes, or documents
        self.seen = 0       # documents offered

    def add(self, documents: list[str]) -> None:
        """Offer the next documents of the corpus (in corpus order)."""
        n = len(documents)
        if not n:
            return
        keys = self._rng.random(n)
        heap = self._heap
        if self._kept >= self._budget:  # full: only keys below the largest kept can enter
            candidates = self._np.flatnonzero(keys < -heap[0][0]).tolist()
        else:
            candidates = range(n)
        for i in candidates:
            key = float(keys[i])
            if self._kept >= self._budget and key >= -heap[0][0]:
                continue
            doc = documents[i]
            size = utf8_size(doc) if self._by_bytes else 1
            heapq.heappush(heap, (-key, self.seen + i, doc, size))
            self._kept += size
            while self._kept - heap[0][3] >= self._budget:  # the rest still meets the budget
                self._kept -= heapq.heappop(heap)[3]
        self.seen += n

    def __len__(self) -> int:
        return len(self._heap)

    def take(self) -> list[str]:
        """The sample in corpus order (the reservoir is emptied: the memory goes with it)."""
        entries = sorted(self._heap, key=lambda e: e[1])
        self._heap = []
        self.documents = len(entries)
        self.bytes = sum(e[3] for e in entries) if self._by_bytes else sum(utf8_size(e[2]) for e in entries)
        return [e[2] for e in entries]

    def summary(self) -> dict[str, Any]:
        """What the sample was (after :meth:`take`): budget, seed, documents and bytes kept, of how many."""
        budget = {"max_bytes": self.max_bytes} if self._by_bytes else {"max_documents": self.max_documents}
        return {**budget, "seed": self.seed, "documents": self.documents, "bytes": self.bytes,
                "of_documents": self.seen}
