"""The RoFormer masked-language model in Flax, computed exactly like transformers v5's
``RoFormerForMaskedLM`` (tests check logit parity).  Parameter tree (``E`` embedding_size,
``H`` hidden, ``D`` head size)::

    embeddings/{word,token_type}_embeddings/embedding   [., E]   (word: the tied decoder)
    embeddings/LayerNorm/{scale, bias}                  [E]
    embeddings_project/{kernel [E, H], bias}            (E != H only)
    encoder/embed_positions/embedding                   [max_position_embeddings, D] (sinusoidal, not trained)
    encoder/layer/<i>/...                               (bert_flax's block, rotary q/k[/v])
    cls/transform/dense/{kernel [H, E], bias}, cls/transform/LayerNorm/{scale, bias}, cls/bias [V]

Positions are 0..L-1 whatever the padding, as in transformers (rotations are relative: left
padding shifts every real token alike); under document attention, from 0 in each document.
Mixed precision as in ``bert_flax``; the rotation is computed in float32.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.models.bert_flax import Intermediate, ResidualOutput, _Base
from mlmtool.models.layers import ACTIVATIONS, Dense, LayerStack, attention, embedding_init, normal_init
from mlmtool.models.network import MaskedLMBase, tied_logits


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """HF ``RoFormerSinusoidalPositionalEmbedding.create_weight``: [n_pos, dim] float32, sines of
    ``pos / 10000 ** (2j / dim)`` in the first half, cosines in the second."""
    j = np.arange(dim)
    angle = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None, :]  # float64, as HF
    half = dim // 2 + dim % 2
    out = np.empty((n_pos, dim), np.float32)
    out[:, :half] = np.sin(angle[:, 0::2])
    out[:, half:] = np.cos(angle[:, 1::2])
    return out


def rotate(x, sin, cos):
    """HF ``apply_rotary_position_embeddings`` on x [B, L, N, D] with sin/cos [1|B, L, D/2]:
    pairs (x0, x1) of adjacent dimensions rotated, in float32; back in x's dtype."""
    xf = x.astype(jnp.float32)
    sin_pos = jnp.repeat(sin, 2, axis=-1)[:, :, None, :]  # [s0, s0, s1, s1, ...]: [., L, 1, D]
    cos_pos = jnp.repeat(cos, 2, axis=-1)[:, :, None, :]
    rotated = jnp.stack([-xf[..., 1::2], xf[..., 0::2]], axis=-1).reshape(xf.shape)  # [-x1, x0, -x3, x2, ...]
    return (xf * cos_pos + rotated * sin_pos).astype(x.dtype)


class SelfAttention(_Base):
    """HF ``RoFormerSelfAttention``: BERT's, with q and k (``rotary_value``: and v) rotated."""

    @nn.compact
    def __call__(self, x, attention_mask, rope, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def project(name):  # [B, L, H] -> [B, L, N, D]
            return self.dense(cfg.hidden_size, name)(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)

        sin, cos = rope
        q, k, v = rotate(project("query"), sin, cos), rotate(project("key"), sin, cos), project("value")
        if cfg.rotary_value:
            v = rotate(v, sin, cos)
        rate = cfg.attention_probs_dropout_prob
        dropout = None
        if not (deterministic or rate == 0.0):
            dropout = functools.partial(self.dropout_layer(rate), deterministic=False)
        out = attention(q, k, v, attention_mask, kernels=self.kernels, dropout=dropout)  # [B, L, N, D]
        return out.reshape(batch, length, cfg.hidden_size)


class Attention(_Base):
    @nn.compact
    def __call__(self, x, attention_mask, rope, deterministic: bool):
        context = SelfAttention(**self.kw, name="self")(x, attention_mask, rope, deterministic)
        return ResidualOutput(**self.kw, name="output")(context, x, deterministic)


class EncoderLayer(_Base):
    """BERT's post-LN block with rotary self-attention.  ``context`` is (attention_mask, (sin, cos)):
    what ``LayerStack`` hands every layer alike."""

    @nn.compact
    def __call__(self, x, context, deterministic: bool):
        attention_mask, rope = context
        x = Attention(**self.kw, name="attention")(x, attention_mask, rope, deterministic)
        h = Intermediate(**self.kw, name="intermediate")(x)
        return ResidualOutput(**self.kw, name="output")(h, x, deterministic)


class SinusoidalTable(nn.Module):
    """HF ``RoFormerSinusoidalPositionalEmbedding``: the table as a parameter, its gradient stopped."""

    positions: int
    dim: int
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self):
        table = self.param("embedding", lambda key, shape, dtype: jnp.asarray(sinusoidal_table(*shape), dtype),
                           (self.positions, self.dim), self.param_dtype)
        return jax.lax.stop_gradient(table)  # frozen, as in transformers


class Encoder(_Base):
    """HF ``RoFormerEncoder``: the sinusoidal table and the ``layer`` ModuleList."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, positions=None):
        cfg = self.config
        table = SinusoidalTable(cfg.max_position_embeddings, cfg.head_dim, self.param_dtype, name="embed_positions")()
        pos = jnp.arange(x.shape[1])[None] if positions is None else positions  # [1|B, L]
        sin, cos = jnp.split(table[pos].astype(jnp.float32), 2, axis=-1)  # each [1|B, L, D/2]
        return LayerStack(EncoderLayer, self.kw, cfg.num_hidden_layers, remat=self.remat, scan=self.scan,
                          name="layer")(x, (attention_mask, (sin, cos)), deterministic)


class Embeddings(_Base):
    """HF ``RoFormerEmbeddings``: word + token type (no positions), E wide, LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = embed(cfg.vocab_size, cfg.embedding_size,
                                     embedding_init=embedding_init(cfg.initializer_range, cfg.pad_token_id))
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.embedding_size,
                                           embedding_init=embedding_init(cfg.initializer_range, None))
        self.LayerNorm = self.layer_norm(None)
        self.dropout = self.dropout_layer(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # [B, L, E]
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class MLMHead(_Base):
    """HF ``RoFormerOnlyMLMHead``: transform (dense H -> E, activation, LayerNorm), tied decoder."""

    @nn.compact
    def __call__(self, x, word_embeddings):
        cfg = self.config
        x = self.dense(cfg.embedding_size, "dense")(x)
        x = self.layer_norm("LayerNorm")(ACTIVATIONS[cfg.hidden_act](x))
        return x


class Head(_Base):
    @nn.compact
    def __call__(self, x, word_embeddings):
        x = MLMHead(**self.kw, name="transform")(x, word_embeddings)
        bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), self.param_dtype)
        return tied_logits(x, word_embeddings, bias, self.dtype)  # [..., V]


class MaskedLM(MaskedLMBase):
    """RoFormer with its MLM head (HF ``RoFormerForMaskedLM``); the call is ``MaskedLMBase``'s."""

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        if self.config.projected:
            self.embeddings_project = Dense(self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                            kernel_init=normal_init(self.config.initializer_range),
                                            form=self.kw["kernels"].dense)
        self.encoder = Encoder(**self.kw, remat=self.remat, scan=self.scan)
        self.cls = Head(**self.kw)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, token_type_ids, deterministic)  # [B, L, E]
        if self.config.projected:
            x = self.embeddings_project(x)  # [B, L, H]
        return self.encoder(x, attention_mask, deterministic, positions)

    def logits(self, x):
        return self.cls(x, self.embeddings.word_embeddings.embedding)
