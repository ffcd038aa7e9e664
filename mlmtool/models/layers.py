"""Layers every model family shares, written once: Dense (optional bias) and dropout in the
form ``mlmtool.runtime.kernels`` picks for the backend, Hugging Face's activations and initialisers,
LayerNorm as torch computes it, the attention entry point, the MLM gather at the masked slots,
and a stack of identical layers with optional gradient checkpointing and ``lax.scan``.

A family's network (``mlmtool/models/<family>_flax.py``) is built from these; nothing here
knows a family's parameter names beyond the ones Flax gives these layers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.runtime.kernels import Kernels
from mlmtool.models.local_attention import local_attention, worth_it

# --------------------------------------------------------------------------- activations
# Hugging Face activation names (transformers.activations.ACT2FN) we reproduce exactly.


def _exact_gelu(x):
    """x * Phi(x) written with erf, as torch.nn.functional.gelu computes it.  (jax.nn.gelu's
    exact form uses erfc, which XLA:CPU expands into a costlier select of two expansions:
    this one makes the training step ~2% faster on CPU, docs/benchmarks.md.)"""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 2**-0.5))


_tanh_gelu = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _exact_gelu,  # HF GELUActivation = torch.nn.functional.gelu (erf)
    "gelu_python": _exact_gelu,
    "gelu_new": _tanh_gelu,  # GPT-2 / BERT-original tanh approximation
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------- initialisers


def normal_init(std: float):
    """HF ``_init_weights``: every Linear kernel and Embedding table ~ N(0, std)."""
    return nn.initializers.normal(stddev=std)


def embedding_init(std: float, padding_idx: int | None):
    """N(0, std) with the ``padding_idx`` row zeroed, like ``nn.Embedding(padding_idx=...)`` in HF."""
    normal = nn.initializers.normal(stddev=std)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)
        return table if padding_idx is None else table.at[padding_idx].set(0)

    return init


# --------------------------------------------------------------------------- Dense and Dropout
#
# nn.Dense / nn.Dropout with the same parameters, initialisation and semantics, in the form
# mlmtool.runtime.kernels chooses for the backend: on XLA:CPU the tuned forms measured in
# docs/benchmarks.md ("Training"), elsewhere the library's.


class Dense(nn.Module):
    """``nn.Dense`` (same parameter names, shapes and initialisation), with the matmul's form
    chosen per backend (``mlmtool.runtime.kernels``):

    * ``"flat"``: ONE 2-D matmul over the flattened leading axes, ``[..., in] -> [N, in] @
      [in, out]``.  With an N-D ``dot_general`` the weight gradient contracts two axes (batch
      and length), and XLA:CPU first copies the output gradient into a transposed layout for
      it; as a 2-D product the gradient is a plain ``x.T @ dy``.  That alone makes the CPU
      training step ~13% faster.
    * ``"nd"``: ``nn.Dense``'s ``dot_general`` over the last axis.
    """

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    form: str = "flat"
    use_bias: bool = True  # ModernBERT's linear layers have none

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.form == "flat":
            y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)  # [N, in] @ [in, out] -> [N, out]
            y = y.reshape(*x.shape[:-1], self.features)  # [N, out] -> [..., out]
        else:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))  # [..., out]
        if not self.use_bias:
            return y
        return y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)


def _threefry2x32(key0, key1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011, "Parallel random numbers: as easy as
    1, 2, 3"), the generator behind ``jax.random``, unrolled: XLA fuses it into one pass.
    (jax lowers it on CPU as a 5-trip while loop that streams the state through memory.)"""
    def rotl(v, r):
        return (v << np.uint32(r)) | (v >> np.uint32(32 - r))

    keys = (key0, key1, key0 ^ key1 ^ np.uint32(0x1BD11BDA))
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = rotl(x1, r) ^ x0
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _random_bits(key, shape) -> jax.Array:
    """uint32 random bits of ``shape``: the first word of the Threefry block of each element's
    index, computed inside the consumer's fusion (nothing is written to memory)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = key.reshape(-1).astype(jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
    return _threefry2x32(key[0], key[1], counter, jnp.zeros_like(counter))[0]


class Dropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``/``torch.nn.Dropout``: zero each element with
    probability ``rate`` and scale the rest by 1 / (1 - rate); uses the 'dropout' rng.

    ``form`` (``mlmtool.runtime.kernels``): ``"fused-threefry"`` draws nn.Dropout's generator
    (Threefry-2x32) unrolled, so that XLA:CPU fuses the bits, the comparison and the select
    into one pass (dropout's share of the CPU step falls from ~7% to ~1%, docs/benchmarks.md);
    ``"jax"`` draws ``jax.random.bits`` with the key's own implementation (``rbg`` on
    accelerators).  A key that is not Threefry's always takes ``"jax"``.
    """

    rate: float
    form: str = "fused-threefry"

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        threshold = np.uint32(min(round(keep_prob * 2**32), 2**32 - 1))  # P(bits < t) = keep_prob
        key = self.make_rng("dropout")
        if self.form == "fused-threefry" and _is_threefry(key):
            bits = _random_bits(key, x.shape or (1,)).reshape(x.shape)
        else:
            bits = jax.random.bits(key, x.shape, jnp.uint32)
        keep = bits < threshold
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def _is_threefry(key) -> bool:
    """A Threefry key: raw uint32[2] (jax's default implementation) or typed with 2 words
    of key data (rbg and unsafe_rbg keys have 4)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key).shape[-1:] == (2,)
    return key.shape[-1:] == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"  # pyright: ignore[reportAttributeAccessIssue] (a flag)


# --------------------------------------------------------------------------- gradient checkpointing

# Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
# arXiv:1604.06174), per layer: what the backward pass keeps of each layer's forward.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
}


def layer_norm(epsilon: float, *, param_dtype: Any = jnp.float32, use_bias: bool = True,
               name: str | None = None) -> nn.LayerNorm:
    """``torch.nn.LayerNorm``: float32 statistics and output, variance as E[(x - mean)^2]
    (``use_fast_variance=False``), optionally without the bias (ModernBERT's ``norm_bias``)."""
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, use_bias=use_bias, name=name)


# --------------------------------------------------------------------------- attention


def attention(q, k, v, attention_mask, *, kernels: Kernels, dropout: Callable | None = None,
              local_window: int | None = None, local: jax.Array | None = None):
    """Scaled dot-product attention (Vaswani et al. 2017) of q, k, v [B, L, N, D] -> [B, L, N, D].

    ``attention_mask`` [B, L] is either

    * bool, the key padding mask: a query attends to every key that is not padding.
      ``kernels.attention`` decides the form it takes: a [B, 1, 1, L] mask for XLA, per-row
      key lengths for cuDNN (rows padded on the right); or
    * integer **segment ids** (document attention; 0 = padding, see :func:`document_segments`):
      a query attends only to the keys of its own segment (Krell et al. 2021,
      arXiv:2107.02027), so documents packed in one row do not see each other.  The full
      layers give ``jax.nn.dot_product_attention`` a dense [B, 1, L, L] boolean on every
      backend: jax's public entry point takes no segment ids, and its cuDNN path only
      per-row lengths (``mlmtool.runtime.kernels``), so cuDNN falls back to XLA here.

    ``local_window`` (sliding-window attention, e.g. ModernBERT's local layers) lets a query
    at i see the keys within ``local_window // 2`` positions of it (combined with either
    mask), in the form ``kernels.local_attention`` names (:func:`windowed_attention`: by
    default blockwise, O(L * W)).  ``local``, a traced bool scalar, says whether
    ``local_window`` applies, for one program that runs layers of both kinds (a scan over
    them: ``lax.cond`` picks the form per layer); None: it applies when given.
    ``dropout`` (attention-probability dropout in training) spells attention out: neither
    fused entry point has dropout.

    A family supports document attention (``Family.document_attention``) when its network
    takes ``segment_ids`` [B, L] and (1) passes them here as ``attention_mask`` in every
    layer, (2) computes its positions (absolute or rotary) with :func:`segment_positions`,
    so that each document starts at position 0 (RoBERTa: ``pad_token_id + 1``).
    """
    if local_window is None:
        return _full_attention(q, k, v, attention_mask, kernels, dropout)
    half = local_window // 2
    if local is None:
        return windowed_attention(q, k, v, attention_mask, half=half, kernels=kernels, dropout=dropout)
    if dropout is not None:  # one spelled-out form for both kinds (dropout is a module call: no cond around it)
        return _spelled_out(q, k, v, _dense_mask(attention_mask, q.shape[1], half, local), dropout)
    return jax.lax.cond(
        local,
        lambda q, k, v: windowed_attention(q, k, v, attention_mask, half=half, kernels=kernels),
        lambda q, k, v: _full_attention(q, k, v, attention_mask, kernels, None),
        q, k, v)


def windowed_attention(q, k, v, attention_mask, *, half: int, kernels: Kernels, dropout: Callable | None = None):
    """Sliding-window attention, |i - j| <= ``half``, in the form ``kernels.local_attention``
    names: ``"blockwise"`` (``mlmtool.models.local_attention``: only the window's scores,
    taken where it computes fewer than the dense form: more than one block, and the spans
    shorter than L); ``"cudnn"`` (cuDNN's fused kernel with a two-sided window and per-row
    key lengths, where the installed jax takes one: ``mlmtool.runtime.kernels``; segments and
    dropout take the blockwise form); ``"dense"``: the [B, 1, L, L] masked form."""
    segments = jnp.issubdtype(attention_mask.dtype, jnp.integer)
    form = kernels.local_attention
    if form == "cudnn" and (segments or dropout is not None):
        form = "blockwise"
    if form == "cudnn":
        lengths = jnp.sum(attention_mask, axis=-1, dtype=jnp.int32)  # [B]
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, local_window_size=(half, half),
                                            implementation="cudnn")  # [B, L, N, D]
    if form == "blockwise" and worth_it(q.shape[1], half):
        return local_attention(q, k, v, attention_mask, half=half, dropout=dropout)
    mask = _dense_mask(attention_mask, q.shape[1], half)
    if dropout is not None:
        return _spelled_out(q, k, v, mask, dropout)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")  # [B, L, N, D]


def _dense_mask(attention_mask, length: int, half: int | None = None, local: jax.Array | None = None):
    """The bool mask [B, 1, 1 or L, L] of the keys each query sees: the padding mask or the
    segments, within ``half`` positions when given (always, or where the traced ``local`` is)."""
    if jnp.issubdtype(attention_mask.dtype, jnp.integer):
        same = attention_mask[:, :, None] == attention_mask[:, None, :]  # [B, L, L]
        mask = (same & (attention_mask[:, None, :] != 0))[:, None]  # keys of the query's segment: [B, 1, L, L]
    else:
        mask = attention_mask[:, None, None, :]  # keys a query may attend to: [B, L] -> [B, 1, 1, L]
    if half is None:
        return mask
    pos = jnp.arange(length)
    near = jnp.abs(pos[:, None] - pos[None, :]) <= half  # [L, L]
    if local is not None:
        near = near | ~local  # a full-attention layer of the scan: every key
    return mask & near[None, None]  # [B, 1, L, L]


def _spelled_out(q, k, v, mask, dropout: Callable):
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * q.shape[-1] ** -0.5  # [B, N, L, L]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1))  # float32 softmax
    return jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)  # [B, L, N, D]


def _full_attention(q, k, v, attention_mask, kernels: Kernels, dropout: Callable | None):
    """Every key the mask allows: spelled out with dropout, else XLA's, or cuDNN's with per-row
    key lengths (padding mask only)."""
    segments = jnp.issubdtype(attention_mask.dtype, jnp.integer)
    if dropout is not None:
        return _spelled_out(q, k, v, _dense_mask(attention_mask, q.shape[1]), dropout)
    if kernels.attention != "cudnn" or segments:  # cuDNN's mask is per-row lengths only
        return jax.nn.dot_product_attention(q, k, v, mask=_dense_mask(attention_mask, q.shape[1]),
                                            implementation="xla")  # [B, L, N, D]
    # cuDNN flash attention; its PADDING mask: keys past each row's length are ignored.
    lengths = jnp.sum(attention_mask, axis=-1, dtype=jnp.int32)  # [B]
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def document_segments(document_starts, input_ids, pad_token_id: int):
    """int32 segment ids [B, L] of the documents packed in each row: a new segment at each
    True of ``document_starts`` [B, L] (where ``prepare`` recorded a document's first token:
    ``BlockStore.read_documents``; the tokens before the first start, the end of a document cut
    by the block boundary, are a segment too); padding is 0.  Boundaries are data, never read
    off the token ids: a literal ``<s>`` in a document's text starts nothing."""
    segments = jnp.cumsum(jnp.asarray(document_starts, jnp.int32), axis=1, dtype=jnp.int32) + 1  # [B, L]
    return jnp.where(jnp.asarray(input_ids) == pad_token_id, 0, segments)


def segment_positions(segment_ids):
    """int32 [B, L]: each token's position inside its segment (0 at each segment's first
    token), from segment ids [B, L] whose segments are contiguous runs."""
    segment_ids = jnp.asarray(segment_ids)
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    first = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)  # [B, L]: where each token's segment starts
    return idx - start


# --------------------------------------------------------------------------- the MLM gather


def gather_masked(x, masked_positions):
    """The final hidden states [B, L, H] at the masked slots, BEFORE the MLM head, so the
    head (the vocabulary-sized matmul) runs on P << L positions, as MosaicBERT does.

    ``masked_positions`` is int [G, P]: G groups of B / G consecutive rows that share their
    P slots, positions indexing the group's rows laid end to end, [0, B / G * L) (G = B:
    one row each).  Returns [G, P, H]."""
    masked_positions = jnp.asarray(masked_positions)
    groups = masked_positions.shape[0]
    if masked_positions.ndim != 2 or x.shape[0] % groups:
        raise ValueError(f"masked_positions must be [G, P] with G dividing the batch size "
                         f"{x.shape[0]}, got shape {masked_positions.shape}")
    x = x.reshape(groups, -1, x.shape[-1])  # [B, L, H] -> [G, B / G * L, H]
    return jnp.take_along_axis(x, masked_positions[:, :, None], axis=1)  # [G, P, H]


# --------------------------------------------------------------------------- the layer stack


class LayerStack(nn.Module):
    """``num_layers`` blocks of one class, named "0", "1", ... (HF's ModuleList: params read
    <name>/<i>/...), each called as ``block(x, attention_mask, deterministic)``.

    ``remat`` is the gradient-checkpointing policy of each layer (REMAT_POLICIES).  With
    ``scan`` the layers run as one ``lax.scan`` over their weights stacked on the fly: XLA
    compiles one layer instead of ``num_layers``, and the parameter tree (checkpoints,
    optimizer state, the export) stays exactly the unrolled one.  Both give the same logits;
    in training their dropout masks differ (the scan folds the layer index into the key).
    """

    block: type
    block_kw: dict
    num_layers: int
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        policy = REMAT_POLICIES[self.remat]
        if self.scan and not self.is_initializing():
            return self._scanned(x, attention_mask, deterministic, policy)
        layer = self.block if self.remat == "none" else nn.remat(self.block, policy=policy, static_argnums=(3,))
        for i in range(self.num_layers):
            x = layer(**self.block_kw, name=str(i))(x, attention_mask, deterministic)
        return x

    def _scanned(self, x, attention_mask, deterministic: bool, policy):
        n = self.num_layers
        layers = [self.variables["params"][str(i)] for i in range(n)]
        stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *layers)  # each leaf [n, ...]
        block = self.block(**self.block_kw, parent=None)  # unbound: applied to one layer's weights
        dropout_key = None if deterministic else self.make_rng("dropout")

        def body(h, weights_and_index):
            weights, i = weights_and_index
            rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
            return block.apply({"params": weights}, h, attention_mask, deterministic, rngs=rngs), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # no CSE to prevent inside a scan
        x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(n)))  # [B, L, H]
        return x
