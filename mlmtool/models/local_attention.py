"""Sliding-window (local) attention that computes only the window: O(L * W), not O(L^2).

A query at position i sees the keys j with ``|i - j| <= half`` (ModernBERT's sliding layers:
``half = local_attention // 2``, transformers' two-sided window), combined with the key
padding mask or with document segment ids, as ``mlmtool.models.layers.attention``'s dense
masked form does.  Blockwise (as Longformer's and BigBird's "sliding chunks", Beltagy et al.
2020, arXiv:2004.05150): the queries are cut into blocks of ``block`` positions; the block
starting at ``n * block`` can only see the keys in ``[n * block - half, (n + 1) * block + half)``,
a span of ``block + 2 * half`` keys, gathered as consecutive key blocks of a copy of k and v
padded by ``half`` on the left (no gather op: pads, reshapes and slices, which XLA fuses and
differentiates for free).  Inside the span the window is a static band: key slot ``s`` is at
distance ``s - half - r`` of query row ``r``, whatever the block.  Each (row, block) pair is
then a small attention problem given to ``jax.nn.dot_product_attention`` (XLA's) with its
[b, S] mask, so the logits, float32 softmax and precision are the dense path's.

Equal to the dense masked form within float rounding at every query that sees at least one
key (every real token).  A query that sees no key at all (a padding position whose window is
all padding) gets the mean of its span's values instead of the mean of all values: both are
arbitrary, neither is read (no real token attends to padding, and the loss ignores it).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MIN_BLOCK = 32  # below this the per-block matmuls are too small to pay (docs/benchmarks.md)


def block_size(half: int) -> int:
    """The default query block: the half-window (the span is then 3 blocks), at least MIN_BLOCK."""
    return max(half, MIN_BLOCK)


def worth_it(length: int, half: int, block: int | None = None) -> bool:
    """Whether the blockwise form computes fewer scores than the dense [L, L] one."""
    b = block or block_size(half)
    blocks = -(-length // b)
    return blocks > 1 and blocks * b * (b + 2 * half) < length * length


def _spans(x, half: int, block: int, blocks: int, fill=0):
    """x [B, L, ...] -> [B, blocks, block + 2 half, ...]: for block n the positions
    [n block - half, (n + 1) block + half), ``fill`` outside [0, L)."""
    span = block + 2 * half
    shifts = -(-span // block)  # key blocks per span
    padded_len = (blocks + shifts - 1) * block
    pad = [(0, 0)] * x.ndim
    pad[1] = (half, padded_len - half - x.shape[1])
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(x.shape[0], blocks + shifts - 1, block, *x.shape[2:])
    x = jnp.concatenate([x[:, i:i + blocks] for i in range(shifts)], axis=2)  # [B, blocks, shifts * block, ...]
    return x[:, :, :span]


def local_attention(q, k, v, attention_mask, *, half: int, block: int | None = None,
                    dropout: Callable | None = None):
    """q, k, v [B, L, N, D] -> [B, L, N, D]: each query attends to the keys at most ``half``
    positions away that ``attention_mask`` [B, L] allows (bool: key padding mask; integer:
    segment ids, 0 = padding, a query sees only its own segment's keys).  ``dropout``, when
    given, is applied to the float32 probabilities (training with attention dropout)."""
    batch, length, heads, dim = q.shape
    b = block or block_size(half)
    blocks = -(-length // b)
    span = b + 2 * half
    segments = jnp.issubdtype(attention_mask.dtype, jnp.integer)

    rows = jnp.pad(q, ((0, 0), (0, blocks * b - length), (0, 0), (0, 0)))
    rows = rows.reshape(batch * blocks, b, heads, dim)  # [B nb, b, N, D]
    keys = _spans(k, half, b, blocks).reshape(batch * blocks, span, heads, dim)  # [B nb, S, N, D]
    values = _spans(v, half, b, blocks).reshape(batch * blocks, span, heads, dim)

    offset = np.arange(span)[None, :] - np.arange(b)[:, None]  # key slot - query row, in [-b + 1, S)
    band = jnp.asarray((offset >= 0) & (offset <= 2 * half))  # [b, S]: |i - j| <= half
    if segments:
        key_seg = _spans(attention_mask, half, b, blocks)  # [B, nb, S], 0 outside [0, L)
        query_seg = jnp.pad(attention_mask, ((0, 0), (0, blocks * b - length))).reshape(batch, blocks, b)
        visible = (query_seg[..., :, None] == key_seg[..., None, :]) & (key_seg != 0)[..., None, :]
    else:
        key_ok = _spans(attention_mask.astype(bool), half, b, blocks, fill=False)  # [B, nb, S]
        visible = jnp.broadcast_to(key_ok[..., None, :], (batch, blocks, b, span))
    mask = (visible & band).reshape(batch * blocks, 1, b, span)  # [B nb, 1, b, S]

    if dropout is None:
        out = jax.nn.dot_product_attention(rows, keys, values, mask=mask, implementation="xla")
    else:  # spelled out, as layers.attention's dropout path
        scores = jnp.einsum("xqnd,xknd->xnqk", rows, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * dim ** -0.5, jnp.finfo(jnp.float32).min)  # [B nb, N, b, S]
        probs = dropout(jax.nn.softmax(scores, axis=-1))
        out = jnp.einsum("xnqk,xknd->xqnd", probs.astype(v.dtype), values)
    return out.reshape(batch, blocks * b, heads, dim)[:, :length]  # [B, L, N, D]
