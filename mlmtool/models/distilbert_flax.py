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

from mlmtool.models.layers import ACTIVATIONS, Dense, LayerStack, attention, embedding_init, layer_norm, normal_init
from mlmtool.models.network import MaskedLMBase, SubModule, tied_logits


class _Base(SubModule):
    def norm(self, name: str | None) -> nn.LayerNorm:
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
            dropout = functools.partial(self.dropout_layer(cfg.attention_dropout), deterministic=False)
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
        return self.dropout_layer(cfg.dropout)(h, deterministic=deterministic)


class TransformerBlock(_Base):
    """HF ``TransformerBlock``: attention, add & ``sa_layer_norm``, FFN, add & ``output_layer_norm``."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        kw = self.kw
        x = self.norm("sa_layer_norm")(SelfAttention(**kw, name="attention")(x, attention_mask, deterministic) + x)
        return self.norm("output_layer_norm")(FFN(**kw, name="ffn")(x, deterministic) + x)


class Embeddings(_Base):
    """HF ``Embeddings``: word + learned position (from 0), LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = embed(cfg.vocab_size, cfg.dim,
                                     embedding_init=embedding_init(cfg.initializer_range, cfg.pad_token_id))
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.dim,
                                         embedding_init=embedding_init(cfg.initializer_range, None))
        self.LayerNorm = self.norm(None)
        self.dropout = self.dropout_layer(cfg.dropout)

    def __call__(self, input_ids, deterministic: bool, positions=None):
        position_ids = jnp.arange(input_ids.shape[1])[None, :] if positions is None \
            else positions  # [1, L] or, per document, [B, L]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [B, L, H]
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class Transformer(_Base):
    """HF ``Transformer``: the ``layer`` ModuleList."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        return LayerStack(TransformerBlock, self.kw, self.config.n_layers, remat=self.remat, scan=self.scan,
                          name="layer")(x, attention_mask, deterministic)


class MaskedLM(MaskedLMBase):
    """DistilBERT with its MLM head (HF ``DistilBertForMaskedLM``); the call is
    ``MaskedLMBase``'s (``token_type_ids`` is ignored: DistilBERT has none)."""

    def setup(self):
        cfg = self.config
        self.embeddings = Embeddings(**self.kw)
        self.transformer = Transformer(**self.kw, remat=self.remat, scan=self.scan)
        # head: vocab_transform, activation, vocab_layer_norm, vocab_projector (tied weight, own bias)
        self.vocab_transform = Dense(cfg.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=normal_init(cfg.initializer_range), form=self.kw["kernels"].dense)
        self.vocab_layer_norm = layer_norm(cfg.layer_norm_eps, param_dtype=self.param_dtype)
        self.vocab_projector = VocabBias(cfg.vocab_size, self.param_dtype)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, deterministic, positions)  # [B, L, H]
        return self.transformer(x, attention_mask, deterministic)  # [B, L, H]

    def logits(self, x):
        x = self.vocab_layer_norm(ACTIVATIONS[self.config.activation](self.vocab_transform(x)))
        return tied_logits(x, self.embeddings.word_embeddings.embedding, self.vocab_projector(), self.dtype)  # [..., V]


class VocabBias(nn.Module):
    """``vocab_projector``'s bias: the decoder's weight is the word-embedding table."""

    size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("bias", nn.initializers.zeros, (self.size,), self.param_dtype)
