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

from mlmtool.models.bert_flax import Encoder, _Base
from mlmtool.models.layers import ACTIVATIONS, embedding_init
from mlmtool.models.network import MaskedLMBase, tied_logits


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

    def __call__(self, input_ids, token_type_ids, deterministic: bool, positions=None):
        position_ids = jnp.arange(input_ids.shape[1])[None, :] if positions is None else positions  # [1|B, L]
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
        return tied_logits(x, word_embeddings, bias, self.dtype)  # [..., V]


class DiscriminatorPredictions(_Base):
    """HF ``ElectraDiscriminatorPredictions``: dense H -> H, hidden_act, dense H -> 1."""

    @nn.compact
    def __call__(self, x):
        x = ACTIVATIONS[self.config.hidden_act](self.dense(self.config.hidden_size, "dense")(x))
        return self.dense(1, "dense_prediction")(x)[..., 0].astype(jnp.float32)  # [...]


class Tower(_Base):
    """One encoder after the shared embeddings (the projection, the layers) and its head."""

    head: str = "generator"  # or "discriminator"
    remat: str = "none"
    scan: bool = False

    def setup(self):
        cfg = self.config
        if cfg.embedding_size != cfg.hidden_size:
            self.embeddings_project = self.dense(cfg.hidden_size, None)
        self.encoder = Encoder(**self.kw, remat=self.remat, scan=self.scan)
        if self.head == "discriminator":
            self.discriminator_predictions = DiscriminatorPredictions(**self.kw)
        else:
            self.generator_predictions = GeneratorPredictions(**self.kw)
            self.generator_lm_head = TiedDecoder(cfg.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype)

    def encode(self, x, attention_mask, deterministic: bool):
        if self.config.embedding_size != self.config.hidden_size:
            x = self.embeddings_project(x)  # [B, L, E] -> [B, L, H]
        return self.encoder(x, attention_mask, deterministic)  # [B, L, H]

    def predict(self, x, word_embeddings):
        """The head: MLM logits [..., V] (generator) or replaced-token logits [...] (discriminator)."""
        if self.head == "discriminator":
            return self.discriminator_predictions(x)
        return self.generator_lm_head(self.generator_predictions(x), word_embeddings)


class Electra(MaskedLMBase):
    """ElectraForMaskedLM, ElectraForPreTraining, or the pair (``config.towers``); the call
    (checks, masks, segment ids, the gather) is ``MaskedLMBase``'s, on the generator when
    there is one, else on the discriminator."""

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        towers = self.config.towers
        kw = {**self.kw, "remat": self.remat, "scan": self.scan}
        if "generator" in towers:
            self.generator = Tower(**{**kw, "config": towers["generator"]}, head="generator")
        if "discriminator" in towers:
            self.discriminator = Tower(**{**kw, "config": towers["discriminator"]}, head="discriminator")

    @property
    def _main(self) -> str:
        return "generator" if "generator" in self.config.towers else "discriminator"

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, token_type_ids, deterministic, positions)  # [B, L, E]
        return getattr(self, self._main).encode(x, attention_mask, deterministic)

    def logits(self, x):
        return getattr(self, self._main).predict(x, self.embeddings.word_embeddings.embedding)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        if self.is_initializing() and len(self.config.towers) > 1:  # create both towers' parameters
            self.discriminate(input_ids, attention_mask, token_type_ids)
        return super().__call__(input_ids, attention_mask, token_type_ids, **kwargs)

    def discriminate(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic: bool = True,
                     segment_ids=None):
        """The discriminator's float32 logits [B, L]: > 0 where it judges the token replaced."""
        ids, mask, types, positions = self.prepare(input_ids, attention_mask, token_type_ids, segment_ids)
        x = self.embeddings(ids, types, deterministic, positions)  # [B, L, E]
        x = self.discriminator.encode(x, mask, deterministic)
        return self.discriminator.predict(x, None)
