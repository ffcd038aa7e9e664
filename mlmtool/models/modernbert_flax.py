"""The ModernBERT masked-language model in Flax (linen), readable top to bottom.

Computed exactly like transformers v5's PyTorch ``ModernBertForMaskedLM`` (tests check
logit-for-logit parity); the parameter tree mirrors its ``state_dict`` names
(``mlmtool.models.modernbert.ModernBertFamily.weight_table`` is the rename table).
Parameter tree (``H`` hidden, ``I`` intermediate, ``V`` vocab; ``[bias]`` with the config's
``*_bias`` flag)::

    model/embeddings/tok_embeddings/embedding     [V, H]   (tied: also the MLM decoder)
    model/embeddings/norm/{scale[, bias]}         [H]
    model/layers/<i>/attn_norm/{scale[, bias]}    [H]      (not layer 0: there it is the identity)
    model/layers/<i>/attn/Wqkv/{kernel [H, 3H][, bias]}
    model/layers/<i>/attn/Wo/{kernel [H, H][, bias]}
    model/layers/<i>/mlp_norm/{scale[, bias]}
    model/layers/<i>/mlp/Wi/{kernel [H, 2I][, bias]}     (GeGLU: input, then gate)
    model/layers/<i>/mlp/Wo/{kernel [I, H][, bias]}
    model/final_norm/{scale[, bias]}
    head/dense/{kernel [H, H][, bias]}, head/norm/{scale[, bias]}
    decoder/bias                                  [V]

Padding: transformers may unpad the batch internally; here padded keys are masked out of
attention (the key padding mask), which gives the same outputs at the real tokens.

Mixed precision as in ``bert_flax``: ``dtype`` is the computation dtype of the matmuls,
LayerNorm statistics and outputs, rotary embeddings, the attention softmax, the residual
stream and the logits stay float32; parameters are float32.

Layers: layer 0 has no ``attn_norm``, and the layers differ in their attention window and
RoPE theta (not in their parameters).  ``remat`` checkpoints each layer; with ``scan``,
layer 0 runs on its own and layers 1..N-1 run as one ``lax.scan`` over their weights
(stacked on the fly: the parameter tree stays the unrolled one), each layer's kind passed
as scanned data.  Both give the same logits; in training their dropout masks differ.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.models.layers import ACTIVATIONS, REMAT_POLICIES, Dense, attention, layer_norm
from mlmtool.models.modernbert import FULL, LAYER_TYPES, SLIDING
from mlmtool.models.network import MaskedLMBase, SubModule, tied_logits


def truncated_normal_init(std: float, cutoff: float):
    """HF ``_init_weights``: ``trunc_normal_(std=std, a=-cutoff * std, b=cutoff * std)``."""
    return nn.initializers.truncated_normal(stddev=std, lower=-cutoff, upper=cutoff)


def rope_tables(length: int, head_dim: int, theta: float, positions=None):
    """HF ``ModernBertRotaryEmbedding`` (default RoPE) at positions 0..length-1: cos and sin
    [L, D], float32, the D/2 frequencies ``theta ** (-2j / D)`` repeated twice; or at
    ``positions`` int [B, L] (document attention: from 0 in each document): [B, L, D]."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponent)  # [D/2], float32 as torch computes it
    pos = jnp.arange(length, dtype=jnp.float32) if positions is None else jnp.asarray(positions, jnp.float32)
    freqs = pos[..., None] * jnp.asarray(inv_freq)  # [L, D/2] or [B, L, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [L, D]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, L, N, D] rotated by the tables [L, D] (HF ``apply_rotary_pos_emb``: in float32,
    ``x cos + rotate_half(x) sin``), back in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)  # rotate_half
    if cos.ndim == 2:  # [L, D] -> [1, L, 1, D]; per row [B, L, D] -> [B, L, 1, D]
        cos, sin = cos[None], sin[None]
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class _Base(SubModule):
    @property
    def std_in(self) -> float:
        """HF's std of the embeddings, Wqkv and Wi."""
        return self.config.initializer_range

    @property
    def std_out(self) -> float:
        """HF's std of the layers writing into the residual stream (both Wo) and the head's dense."""
        return self.config.initializer_range / (2.0 * self.config.num_hidden_layers) ** 0.5

    def trunc_dense(self, features: int, name: str, *, std: float, use_bias: bool) -> Dense:
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=use_bias,
                     kernel_init=truncated_normal_init(std, self.config.initializer_cutoff_factor),
                     form=self.kernels.dense, name=name)

    def norm(self, name: str | None = None) -> nn.LayerNorm:
        return layer_norm(self.config.norm_eps, param_dtype=self.param_dtype, use_bias=self.config.norm_bias,
                          name=name)


class Embeddings(_Base):
    """HF ``ModernBertEmbeddings``: token embeddings (no positions), LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        # HF's nn.Embedding(padding_idx=pad) is re-initialised whole by _init_weights: the
        # padding row is not zeroed.
        self.tok_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                       embedding_init=truncated_normal_init(self.std_in, cfg.initializer_cutoff_factor))
        self.norm_layer = self.norm("norm")
        self.drop = self.dropout_layer(cfg.embedding_dropout)

    def __call__(self, input_ids, deterministic: bool):
        x = self.norm_layer(self.tok_embeddings(input_ids))  # [B, L, H], float32
        return self.drop(x, deterministic=deterministic)


class Attention(_Base):
    """HF ``ModernBertAttention``: fused Wqkv, rotary embeddings on q and k, (sliding-window)
    attention, Wo, dropout.  ``kind`` is the layer's attention (FULL or SLIDING); None: the
    traced bool ``local`` says, in a scan over layers of both kinds."""

    kind: str | None = None

    @nn.compact
    def __call__(self, x, attention_mask, rope, local, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape
        qkv = self.trunc_dense(3 * cfg.hidden_size, "Wqkv", std=self.std_in, use_bias=cfg.attention_bias)(x)
        qkv = qkv.reshape(batch, length, 3, cfg.num_heads, cfg.head_dim)  # [B, L, 3H] -> [B, L, 3, N, D]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, L, N, D]
        if self.kind is None:
            cos, sin = (jnp.where(local, a, b) for a, b in zip(rope[SLIDING], rope[FULL]))
        else:
            cos, sin = rope[self.kind]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rate = cfg.attention_dropout
        dropout = None
        if not (deterministic or rate == 0.0):
            dropout = functools.partial(self.dropout_layer(rate), deterministic=False)
        window = None if self.kind == FULL else cfg.local_attention
        out = attention(q, k, v, attention_mask, kernels=self.kernels, dropout=dropout, local_window=window,
                        local=local if self.kind is None else None)  # [B, L, N, D]
        out = self.trunc_dense(cfg.hidden_size, "Wo", std=self.std_out, use_bias=cfg.attention_bias)(
            out.reshape(batch, length, cfg.hidden_size))  # [B, L, H]
        return self.dropout_layer(rate)(out, deterministic=deterministic)


class MLP(_Base):
    """HF ``ModernBertMLP``: GeGLU, Wo(dropout(act(input) * gate)) with [input, gate] = Wi(x)."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = self.trunc_dense(2 * cfg.intermediate_size, "Wi", std=self.std_in, use_bias=cfg.mlp_bias)(x)  # [B, L, 2I]
        inputs, gate = h[..., :cfg.intermediate_size], h[..., cfg.intermediate_size:]
        h = ACTIVATIONS[cfg.hidden_activation](inputs) * gate  # [B, L, I]
        h = self.dropout_layer(cfg.mlp_dropout)(h, deterministic=deterministic)
        return self.trunc_dense(cfg.hidden_size, "Wo", std=self.std_out, use_bias=cfg.mlp_bias)(h)  # [B, L, H]


class Layer(_Base):
    """HF ``ModernBertEncoderLayer``: pre-norm attention and MLP, each added to the residual."""

    first: bool = False  # layer 0: no attn_norm
    kind: str | None = None  # FULL, SLIDING, or None: the traced ``local`` decides

    @nn.compact
    def __call__(self, x, attention_mask, rope, local, deterministic: bool):
        h = x if self.first else self.norm("attn_norm")(x)
        x = x + Attention(**self.kw, kind=self.kind, name="attn")(h, attention_mask, rope, local, deterministic)
        return x + MLP(**self.kw, name="mlp")(self.norm("mlp_norm")(x), deterministic)


class Layers(_Base):
    """HF ``layers`` (a ModuleList: blocks "0", "1", ...), unrolled or scanned (module docstring)."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, rope, deterministic: bool):
        cfg = self.config
        policy = REMAT_POLICIES[self.remat]
        # static_argnums counts self: (self, x, attention_mask, rope, local, deterministic)
        layer = Layer if self.remat == "none" else nn.remat(Layer, policy=policy, static_argnums=(5,))
        scan = self.scan and cfg.num_layers > 2 and not self.is_initializing()
        for i in range(1 if scan else cfg.num_layers):
            x = layer(**self.kw, first=i == 0, kind=cfg.layer_types[i], name=str(i))(
                x, attention_mask, rope, None, deterministic)
        return self._scanned(x, attention_mask, rope, deterministic, policy) if scan else x

    def _scanned(self, x, attention_mask, rope, deterministic: bool, policy):
        """Layers 1..N-1 as one lax.scan: each step applies the unbound Layer to one layer's
        weights, with the layer's kind (and dropout key) as scanned data."""
        cfg = self.config
        rest = range(1, cfg.num_layers)
        stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p),  # each leaf [N - 1, ...]
                                         *[self.variables["params"][str(i)] for i in rest])
        kinds = sorted(set(cfg.layer_types[1:]))
        block = Layer(**self.kw, kind=kinds[0] if len(kinds) == 1 else None, parent=None)
        local = jnp.asarray([cfg.layer_types[i] == SLIDING for i in rest])  # [N - 1] bool
        dropout_key = None if deterministic else self.make_rng("dropout")

        def body(h, xs):
            weights, is_local, i = xs
            rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
            return block.apply({"params": weights}, h, attention_mask, rope, is_local, deterministic,
                               rngs=rngs), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # no CSE to prevent inside a scan
        x, _ = jax.lax.scan(body, x, (stacked, local, jnp.arange(1, cfg.num_layers)))  # [B, L, H]
        return x


class Model(_Base):
    """HF ``ModernBertModel``: embeddings, the layers, final_norm."""

    remat: str = "none"
    scan: bool = False

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        self.layers = Layers(**self.kw, remat=self.remat, scan=self.scan)
        self.final_norm = self.norm()

    def __call__(self, input_ids, attention_mask, deterministic: bool, positions=None):
        cfg = self.config
        x = self.embeddings(input_ids, deterministic)  # [B, L, H]
        # Positions 0..L-1 whatever the padding, as HF (RoPE is relative: left padding only
        # shifts every real token alike); with document attention, from 0 in each document.
        rope = {kind: rope_tables(input_ids.shape[1], cfg.head_dim, cfg.rope_theta(kind), positions)
                for kind in LAYER_TYPES}
        x = self.layers(x, attention_mask, rope, deterministic)
        return self.final_norm(x)


class Head(_Base):
    """HF ``ModernBertPredictionHead``: dense, classifier_activation, LayerNorm."""

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = self.trunc_dense(cfg.hidden_size, "dense", std=self.std_out, use_bias=cfg.classifier_bias)(x)
        return self.norm("norm")(ACTIVATIONS[cfg.classifier_activation](x))


class Decoder(_Base):
    """HF ``decoder``: the token embeddings as the output matrix (tied), plus its own bias."""

    @nn.compact
    def __call__(self, x, embeddings):
        bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), self.param_dtype) \
            if self.config.decoder_bias else None
        return tied_logits(x, embeddings, bias, self.dtype)  # [..., H] x [V, H] -> [..., V]


class MaskedLM(MaskedLMBase):
    """ModernBERT with the masked-language-model head (HF ``ModernBertForMaskedLM``); the call
    is ``MaskedLMBase``'s (``token_type_ids`` is ignored: ModernBERT has no segment
    embeddings; under document attention the rotary positions restart at each document)."""

    length_hint = "use shorter sequences or raise max_position_embeddings (RoPE has no position table)"

    def setup(self):
        self.model = Model(**self.kw, remat=self.remat, scan=self.scan)
        self.head = Head(**self.kw)
        self.decoder = Decoder(**self.kw)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        return self.model(input_ids, attention_mask, deterministic, positions)  # [B, L, H]

    def logits(self, x):
        return self.decoder(self.head(x), self.model.embeddings.tok_embeddings.embedding)
