"""The DistilBERT masked-language model in Flax, computed exactly like transformers v5's
``DistilBertForMaskedLM`` (tests check logit parity), parameter tree mirroring its
``state_dict`` (``H`` = dim, ``I`` = hidden_dim, ``V`` vocab)::

    embeddings/word_embeddings/embedding          [V, H]   (tied: also the MLM decoder)
    embeddings/position_embeddings/embedding      [max_position_embeddings, H]
    embeddings/LayerNorm/{scale, bias}            [H]
    transformer/layer/<i>/attention/{q_lin,k_lin,v_lin,out_lin}/{kernel [H, H], bias [H]}
    transformer/layer/<i>/sa_layer_norm/{scale, bias}
    transformer/layer/<i>/ffn/lin1/{kernel [H, I], bias [I]}, ffn/lin2/{kernel [I, H], bias [H]}
    transformer/layer/<i>/output_layer_norm/{scale, bias}
    vocab_transform/{kernel [H, H], bias [H]}, vocab_layer_norm/{scale, bias}
    vocab_projector/bias                           [V]

The block is BERT's post-LN block, except that the attention output goes into its LayerNorm
without a dropout (as in HF).  Mixed precision as in ``bert_flax``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mlmtool.errors import ConfigError
from mlmtool.kernels import Kernels, select as select_kernels
from mlmtool.models.distilbert import DistilBertConfig
from mlmtool.models.layers import (
    ACTIVATIONS,
    Dense,
    Dropout,
    LayerStack,
    attention,
    embedding_init,
    gather_masked,
    layer_norm,
    normal_init,
    segment_positions,
)


class _Base(nn.Module):
    config: DistilBertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    def dense(self, features: int, name: str) -> Dense:
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=normal_init(self.config.initializer_range), form=self.kernels.dense, name=name)

    def norm(self, name: str) -> nn.LayerNorm:
        return layer_norm(self.config.layer_norm_eps, param_dtype=self.param_dtype, name=name)


class SelfAttention(_Base):
    """HF ``DistilBertSelfAttention``: q/k/v projections, attention, the ``out_lin`` projection."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def project(name):
            # [B, L, H] -> [B, L, N, D]
            return self.dense(cfg.dim, name)(x).reshape(batch, length, cfg.n_heads, cfg.head_dim)

        dropout = None
        if not (deterministic or cfg.attention_dropout == 0.0):
            dropout = functools.partial(Dropout(cfg.attention_dropout, form=self.kernels.dropout), deterministic=False)
        context = attention(project("q_lin"), project("k_lin"), project("v_lin"), attention_mask,
                            kernels=self.kernels, dropout=dropout)  # [B, L, N, D]
        context = context.reshape(batch, length, cfg.dim)  # [B, L, N, D] -> [B, L, H]
        return self.dense(cfg.dim, "out_lin")(context)


class FFN(_Base):
    """HF ``FFN``: lin1, activation, lin2, dropout."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = ACTIVATIONS[cfg.activation](self.dense(cfg.hidden_dim, "lin1")(x))
        h = self.dense(cfg.dim, "lin2")(h)
        return Dropout(cfg.dropout, form=self.kernels.dropout)(h, deterministic=deterministic)


class TransformerBlock(_Base):
    """HF ``TransformerBlock``: attention, add & ``sa_layer_norm``, FFN, add & ``output_layer_norm``."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
        x = self.norm("sa_layer_norm")(SelfAttention(**kw, name="attention")(x, attention_mask, deterministic) + x)
        return self.norm("output_layer_norm")(FFN(**kw, name="ffn")(x, deterministic) + x)


class Embeddings(_Base):
    """HF ``Embeddings``: word + learned position (from 0), LayerNorm, dropout."""

    @nn.compact
    def __call__(self, input_ids, deterministic: bool, segment_ids=None):
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        words = embed(cfg.vocab_size, cfg.dim, name="word_embeddings",
                      embedding_init=embedding_init(cfg.initializer_range, cfg.pad_token_id))
        positions = embed(cfg.max_position_embeddings, cfg.dim, name="position_embeddings",
                          embedding_init=embedding_init(cfg.initializer_range, None))
        position_ids = jnp.arange(input_ids.shape[1])[None, :] if segment_ids is None \
            else segment_positions(segment_ids)  # [1, L] or, per document, [B, L]
        x = words(input_ids) + positions(position_ids)  # [B, L, H]
        x = self.norm("LayerNorm")(x)
        return Dropout(cfg.dropout, form=self.kernels.dropout)(x, deterministic=deterministic), words.embedding


class Transformer(_Base):
    """HF ``Transformer``: the ``layer`` ModuleList."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)
        return LayerStack(TransformerBlock, kw, self.config.n_layers, remat=self.remat, scan=self.scan,
                          name="layer")(x, attention_mask, deterministic)


class MaskedLM(nn.Module):
    """DistilBERT with its MLM head (HF ``DistilBertForMaskedLM``); arguments and outputs as
    ``bert_flax.MaskedLM``'s (``token_type_ids`` is accepted and ignored: DistilBERT has none)."""

    config: DistilBertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels | None = None
    remat: str = "none"
    scan_layers: bool | None = None  # None: scan exactly when gradient checkpointing is on

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, masked_positions=None, segment_ids=None):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_sequence_length:
            raise ConfigError(f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                              f"{cfg.max_sequence_length} (max_position_embeddings={cfg.max_position_embeddings})",
                              hint="use shorter sequences or a model with more position embeddings")
        attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None \
            else jnp.asarray(attention_mask).astype(bool)  # [B, L]
        if segment_ids is not None:  # document attention: the encoder's mask becomes the segment ids
            segment_ids = jnp.where(attention_mask, jnp.asarray(segment_ids, jnp.int32), 0)  # [B, L]
            attention_mask = segment_ids
        kernels = self.kernels or select_kernels(dtype=jnp.dtype(self.dtype).name, head_dim=cfg.head_dim)
        kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype, kernels=kernels)
        scan = self.remat != "none" if self.scan_layers is None else self.scan_layers

        x, word_embeddings = Embeddings(**kw, name="embeddings")(input_ids, deterministic, segment_ids)  # [B, L, H]
        x = Transformer(**kw, remat=self.remat, scan=scan, name="transformer")(x, attention_mask, deterministic)
        if masked_positions is not None:
            x = gather_masked(x, masked_positions)  # [G, P, H]
        # head: vocab_transform, activation, vocab_layer_norm, vocab_projector (tied weight, own bias)
        x = Dense(cfg.dim, dtype=self.dtype, param_dtype=self.param_dtype, form=kernels.dense,
                  kernel_init=normal_init(cfg.initializer_range), name="vocab_transform")(x)
        x = layer_norm(cfg.layer_norm_eps, param_dtype=self.param_dtype, name="vocab_layer_norm")(
            ACTIVATIONS[cfg.activation](x))
        bias = VocabBias(cfg.vocab_size, self.param_dtype, name="vocab_projector")()  # [V]
        logits = jnp.einsum("...h,vh->...v", x.astype(self.dtype), word_embeddings.astype(self.dtype),
                            preferred_element_type=jnp.float32)  # [..., V]
        return logits + bias.astype(jnp.float32)


class VocabBias(nn.Module):
    """``vocab_projector``'s bias: the decoder's weight is the word-embedding table."""

    size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("bias", nn.initializers.zeros, (self.size,), self.param_dtype)
