"""--document-attention: a packed block computes what each of its documents alone would, for
every registered family that supports it (``Family.document_attention``); no gradient crosses
a document boundary; segment ids and positions from the document starts ``prepare`` records."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.models import families, load_model
from mlmtool.models.layers import document_segments, segment_positions

CASES = {name: fields for family in families().values() if family.document_attention
         for name, fields in family.tiny_test_configs().items()}


def _framing(fields: dict) -> tuple[int, int, int]:
    """(start, end, pad) ids: RoBERTa's <s> </s> around pad 1, BERT's [CLS] [SEP] after [PAD] 0."""
    pad = fields.get("pad_token_id", 0)
    return (0, 2, pad) if pad != 0 else (2, 3, pad)


def _packed_row(fields: dict, rng) -> tuple[np.ndarray, list[slice]]:
    """A block as prepare packs it: the tail of a cut document, three framed documents, padding
    (the second holds a literal start id in its text, which is no boundary)."""
    start, end, pad = _framing(fields)
    vocab = fields.get("vocab_size")
    pieces, spans, at = [], [], 0
    for n, framed in ((4, False), (7, True), (11, True), (5, True)):
        doc = list(rng.integers(5, vocab, size=n))
        doc = [start, *doc[1:-1], end] if framed else doc
        if n == 11:
            doc[5] = start  # a literal <s>/[CLS] inside the text
        pieces += doc
        spans.append(slice(at, at + n))
        at += n
    return np.asarray(pieces + [pad] * 5, np.int32), spans


def _starts(row: np.ndarray, docs: list[slice]) -> jnp.ndarray:
    """[1, L] the recorded starts: each framed document's first token (not the cut tail's)."""
    starts = np.zeros(row.shape, bool)
    starts[[d.start for d in docs[1:]]] = True
    return jnp.asarray(starts)[None]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_packed_block_equals_each_document_alone(name):
    fields = CASES[name]
    loaded = load_model(fields)
    params = loaded.init(0)
    row, docs = _packed_row(fields, np.random.default_rng(0))
    _, _, pad = _framing(fields)
    ids = jnp.asarray(row)[None]
    segments = document_segments(_starts(row, docs), ids, pad)
    packed = loaded.module.apply({"params": params}, ids, attention_mask=ids != pad, segment_ids=segments)
    # Each document alone in its own row, padded on the right (one batch, as predict runs them).
    alone_ids = np.full((len(docs), max(d.stop - d.start for d in docs)), pad, np.int32)
    for i, doc in enumerate(docs):
        alone_ids[i, :doc.stop - doc.start] = row[doc]
    alone = loaded.module.apply({"params": params}, jnp.asarray(alone_ids), attention_mask=alone_ids != pad)
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(np.asarray(packed[0, doc]), np.asarray(alone[i, :doc.stop - doc.start]),
                                   atol=1e-5, rtol=0, err_msg=f"{name} {doc}")
    # Without document attention the documents do see each other (by more than the tolerance
    # above; ModernBERT's fresh init, with its sliding windows, moves them by ~2e-4).
    plain = loaded.module.apply({"params": params}, ids, attention_mask=ids != pad)
    assert not np.allclose(np.asarray(plain[0, docs[2]]), np.asarray(packed[0, docs[2]]), atol=1e-4)


@pytest.mark.parametrize("family", sorted(f.name for f in families().values() if f.document_attention))
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_no_gradient_crosses_a_document_boundary(family):
    """d(a token's logits) / d(every input embedding) is exactly 0 outside its document, in
    training mode (dropout on, so attention is spelled out) and in inference mode."""
    name, fields = next(iter(families()[family].tiny_test_configs().items()))
    fields = {k: (0.1 if "dropout" in k and isinstance(v, float) else v) for k, v in fields.items()}
    loaded = load_model(fields)
    params = loaded.init(1)
    row, docs = _packed_row(fields, np.random.default_rng(1))
    _, _, pad = _framing(fields)
    ids = jnp.asarray(row)[None]
    segments = document_segments(_starts(row, docs), ids, pad)
    vocab = fields["vocab_size"]

    def logits(delta, deterministic):
        def add_delta(next_fun, args, kwargs, context):  # the word embeddings' output, plus delta
            out = next_fun(*args, **kwargs)
            if (context.method_name == "__call__" and isinstance(context.module, nn.Embed)
                    and context.module.num_embeddings == vocab):
                out = out + delta
            return out

        with nn.intercept_methods(add_delta):
            return loaded.module.apply({"params": params}, ids, attention_mask=ids != pad, segment_ids=segments,
                                       deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(2)})[0]

    width = next(x.shape[1] for x in jax.tree_util.tree_leaves(params) if x.ndim == 2 and x.shape[0] == vocab)
    delta = jnp.zeros((1, len(row), width), jnp.float32)  # added to the word embeddings [1, L, H]
    # One cotangent per document: the sum of the logits of its second token.
    cotangents = jnp.zeros((len(docs), len(row), vocab)).at[jnp.arange(len(docs)),
                                                            jnp.asarray([d.start + 1 for d in docs])].set(1.0)
    for deterministic in (True, False):
        _, pullback = jax.vjp(lambda d: logits(d, deterministic), delta)
        grads = np.asarray(jax.vmap(lambda c: pullback(c)[0][0])(cotangents))  # [docs, L, H]
        for doc, grad in zip(docs, grads):
            inside = np.zeros(len(row), bool)
            inside[doc] = True
            assert np.all(grad[~inside] == 0.0), (name, doc, deterministic)
            assert np.any(grad[inside] != 0.0)


def test_segments_and_positions_from_the_recorded_starts():
    ids = jnp.asarray([[7, 8, 2, 0, 9, 9, 2, 0, 5, 1, 1],   # RoBERTa: a cut tail, two documents, padding
                       [0, 5, 6, 2, 0, 7, 2, 1, 1, 1, 1]])  # the second 0 of row 1: a literal <s> in the text
    starts = jnp.asarray([[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
                          [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    seg = document_segments(starts, ids, pad_token_id=1)
    assert seg.tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0], [2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0]]
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
