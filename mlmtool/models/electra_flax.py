"""The ELECTRA networks in Flax (linen): transformers v5's ``ElectraForMaskedLM`` (the
generator) and ``ElectraForPreTraining`` (the discriminator), alone or as the pair that
ELECTRA pre-training trains (``mlmtool.models.electra``).  Parameter tree (``E`` embedding,
``H`` hidden, ``V`` vocab; each tower has its own H)::

    embeddings/{word,position,token_type}_embeddings/embedding   [rows, E]  (shared by the towers)
    embeddings/LayerNorm/{scale, bias}                           [E]
    <tower>/embeddings_project/{kernel [E, H], bias}             (E != H only)
    <tower>/encoder/layer/<i>/...                                BERT's post-LN blocks (bert_flax)
    generator/generator_predictions/dense/{kernel [H, E], bias}, generator_predictions/LayerNorm
    generator/generator_lm_head/bias                             [V]  (decoder: the word embeddings)
    discriminator/discriminator_predictions/{dense [H, H], dense_prediction [H, 1]}

``<tower>`` is ``generator`` (ElectraForMaskedLM, and the pair) and/or ``discriminator``
(ElectraForPreTraining).  ``__call__`` is the generator's MLM logits when there is a
generator (so train, eval and predict treat the pair as its generator), the discriminator's
logits [B, L] otherwise; ``discriminate`` is the discriminator's.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mlmtool.errors import ConfigError
from mlmtool.kernels import Kernels, select as select_kernels
from mlmtool.models.bert_flax import Encoder, _Base
from mlmtool.models.electra import ElectraConfig
from mlmtool.models.layers import ACTIVATIONS, REMAT_POLICIES, embedding_init, gather_masked, segment_positions


class Embeddings(_Base):
    """HF ``ElectraEmbeddings``: word + token type + position (width E), LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        E = cfg.embedding_size
        self.word_embeddings = embed(cfg.vocab_size, E, embedding_init=embedding_init(cfg.initializer_range,
                                                                                      cfg.pad_token_id))
        self.position_embeddings = embed(cfg.max_position_embeddings, E,
                                         embedding_init=embedding_init(cfg.initializer_range, None))
        self.token_type_embeddings = embed(cfg.type_vocab_size, E,
                                           embedding_init=embedding_init(cfg.initializer_range, None))
        self.LayerNorm = self.layer_norm("LayerNorm")
        self.dropout = self.dropout_layer(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool, segment_ids=None):
        position_ids = jnp.arange(input_ids.shape[1])[None, :] if segment_ids is None \
            else segment_positions(segment_ids)  # [1, L] or [B, L]: from 0 in each document
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # [B, L, E]
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class GeneratorPredictions(_Base):
    """HF ``ElectraGeneratorPredictions``: dense H -> E, exact GELU (whatever hidden_act), LayerNorm."""

    @nn.compact
    def __call__(self, x):
        x = self.dense(self.config.embedding_size, "dense")(x)
        return self.layer_norm("LayerNorm")(ACTIVATIONS["gelu"](x))


class TiedDecoder(nn.Module):
    """HF ``generator_lm_head``: x @ word_embeddings.T + bias, in float32."""

    vocab_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, word_embeddings):
        bias = self.param("bias", nn.initializers.zeros, (self.vocab_size,), self.param_dtype)
        logits = jnp.einsum("...e,ve->...v", x.astype(self.dtype), word_embeddings.astype(self.dtype),
                            preferred_element_type=jnp.float32)  # [..., V]
        return logits + bias.astype(jnp.float32)


class DiscriminatorPredictions(_Base):
    """HF ``ElectraDiscriminatorPredictions``: dense H -> H, hidden_act, dense H -> 1."""

    @nn.compact
    def __call__(self, x):
        x = ACTIVATIONS[self.config.hidden_act](self.dense(self.config.hidden_size, "dense")(x))
        return self.dense(1, "dense_prediction")(x)[..., 0].astype(jnp.float32)  # [B, L]


class Tower(_Base):
    """One encoder after the shared embeddings: the projection, the layers and its head."""

    head: str = "generator"  # or "discriminator"
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool, masked_positions=None, word_embeddings=None):
        cfg = self.config
        if cfg.embedding_size != cfg.hidden_size:
            x = self.dense(cfg.hidden_size, "embeddings_project")(x)  # [B, L, E] -> [B, L, H]
        x = Encoder(**self.kw, remat=self.remat, scan=self.scan, name="encoder")(x, attention_mask, deterministic)
        if self.head == "discriminator":
            return DiscriminatorPredictions(**self.kw, name="discriminator_predictions")(x)  # [B, L]
        if masked_positions is not None:
            x = gather_masked(x, masked_positions)  # [G, P, H]
        x = GeneratorPredictions(**self.kw, name="generator_predictions")(x)
        return TiedDecoder(cfg.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="generator_lm_head")(x, word_embeddings)  # [B, L, V] or [G, P, V]


class Electra(nn.Module):
    """ElectraForMaskedLM, ElectraForPreTraining, or the pair (``config.towers``).
    ``kernels``/``remat``/``scan_layers`` as ``bert_flax.MaskedLM``'s."""

    config: ElectraConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels | None = None
    remat: str = "none"
    scan_layers: bool | None = None

    def setup(self):
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown gradient checkpointing policy {self.remat!r}",
                              hint=f"use one of {', '.join(REMAT_POLICIES)}")
        kernels = self.kernels or select_kernels(dtype=jnp.dtype(self.dtype).name, head_dim=self.config.head_dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernels=kernels)
        scan = self.remat != "none" if self.scan_layers is None else self.scan_layers
        self.embeddings = Embeddings(config=self.config, **kw)
        towers = self.config.towers
        if "generator" in towers:
            self.generator = Tower(config=towers["generator"], head="generator", remat=self.remat, scan=scan, **kw)
        if "discriminator" in towers:
            self.discriminator = Tower(config=towers["discriminator"], head="discriminator", remat=self.remat,
                                       scan=scan, **kw)

    def _inputs(self, input_ids, attention_mask, token_type_ids, segment_ids):
        """The checks and defaults of every family's network (``bert_flax.MaskedLM``)."""
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
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if segment_ids is not None:  # the encoder's mask becomes the segment ids (layers.attention)
            segment_ids = jnp.where(attention_mask, jnp.asarray(segment_ids, jnp.int32), 0)  # [B, L]
            attention_mask = segment_ids
        return input_ids, attention_mask, token_type_ids, segment_ids

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, masked_positions=None, segment_ids=None):
        """The generator's float32 MLM logits [B, L, V] (or [G, P, V] at ``masked_positions``,
        ``layers.gather_masked``); without a generator, the discriminator's [B, L]."""
        if not hasattr(self, "generator"):
            return self.discriminate(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                                     segment_ids=segment_ids)
        if self.is_initializing() and hasattr(self, "discriminator"):  # create both towers' parameters
            self.discriminate(input_ids, attention_mask, token_type_ids, segment_ids=segment_ids)
        ids, mask, types, segments = self._inputs(input_ids, attention_mask, token_type_ids, segment_ids)
        x = self.embeddings(ids, types, deterministic, segments)  # [B, L, E]
        return self.generator(x, mask, deterministic, masked_positions, self.embeddings.word_embeddings.embedding)

    def discriminate(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True,
                     segment_ids=None):
        """The discriminator's float32 logits [B, L]: > 0 where it judges the token replaced."""
        ids, mask, types, segments = self._inputs(input_ids, attention_mask, token_type_ids, segment_ids)
        x = self.embeddings(ids, types, deterministic, segments)  # [B, L, E]
        return self.discriminator(x, mask, deterministic)
