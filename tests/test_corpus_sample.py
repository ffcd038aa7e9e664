"""The corpus sample behind ``tokenizer --sample-bytes/--sample-documents`` (mlmtool.data.corpus.sample):
seeded, within its budget, uniform over the documents, independent of the batch sizes."""

from __future__ import annotations

import random

import pytest

from mlmtool.data.corpus.sample import Reservoir, utf8_size

# Documents of very different lengths, each naming its position; some not ASCII.
DOCS = [f"doc {i} " + ("wörd " if i % 7 == 0 else "word ") * random.Random(i).randint(0, 60) for i in range(4000)]


def sample(docs, batch: int = 250, **kw) -> tuple[list[str], Reservoir]:
    r = Reservoir(**kw)
    for start in range(0, len(docs), batch):
        r.add(docs[start:start + batch])
    return r.take(), r


def test_deterministic_for_a_seed_whatever_the_batches():
    a, _ = sample(DOCS, max_bytes=50_000, seed=7)
    b, _ = sample(DOCS, batch=33, max_bytes=50_000, seed=7)
    assert a == b
    assert a == sorted(a, key=DOCS.index)  # in corpus order


def test_seeds_give_different_samples():
    samples = [set(sample(DOCS, max_documents=200, seed=s)[0]) for s in range(3)]
    assert all(len(s) == 200 for s in samples)
    assert len(samples[0] & samples[1]) < 100 and len(samples[1] & samples[2]) < 100  # ~10 in common


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_within_the_budget_give_or_take_one_document(seed):
    docs, r = sample(DOCS, max_bytes=30_000, seed=seed)
    total = sum(utf8_size(d) for d in docs)
    assert 30_000 <= total < 30_000 + max(map(utf8_size, docs))
    assert r.summary() == {"max_bytes": 30_000, "seed": seed, "documents": len(docs), "bytes": total,
                           "of_documents": len(DOCS)}
    assert len(sample(DOCS, max_documents=123, seed=seed)[0]) == 123


def test_a_budget_beyond_the_corpus_keeps_it_all():
    assert sample(DOCS[:50], max_bytes=10**9)[0] == DOCS[:50]
    assert sample(DOCS[:50], max_documents=51)[0] == DOCS[:50]


def test_roughly_uniform_over_the_corpus():
    # first half and second half in equal proportions (hypergeometric sd ~14 documents)
    docs, _ = sample(DOCS, max_documents=1000, seed=0)
    first = sum(int(d.split()[1]) < 2000 for d in docs)
    assert 440 <= first <= 560, first
    by_bytes, _ = sample(DOCS, max_bytes=len("".join(DOCS)) // 4, seed=1)
    first = sum(int(d.split()[1]) < 2000 for d in by_bytes) / len(by_bytes)
    assert 0.44 <= first <= 0.56, first
    # every position equally likely: 60 documents, 10 drawn, 300 seeds (expect 50 each, sd ~6.5)
    counts = [0] * 60
    for seed in range(300):
        for d in sample(DOCS[:60], batch=7, max_documents=10, seed=seed)[0]:
            counts[int(d.split()[1])] += 1
    assert min(counts) >= 25 and max(counts) <= 75, counts


def test_budget_checked():
    for kw in ({}, {"max_bytes": 1, "max_documents": 1}, {"max_bytes": 0}):
        with pytest.raises(ValueError):
            Reservoir(**kw)
