"""The RoBERTa-PreLayerNorm masked-language model in Flax, computed exactly like transformers
v5's ``RobertaPreLayerNormForMaskedLM`` (tests check logit parity).  Embeddings and head are
``bert_flax``'s (RoBERTa's position ids and exact-GELU head); the block is pre-norm::

    embeddings/...                                   (as bert_flax)
    encoder/layer/<i>/attention/LayerNorm/{scale, bias}
    encoder/layer/<i>/attention/self/{query,key,value}/{kernel [H, H], bias}
    encoder/layer/<i>/attention/output/dense/{kernel [H, H], bias}
    encoder/layer/<i>/intermediate/{LayerNorm, dense [H, I]}
    encoder/layer/<i>/output/dense/{kernel [I, H], bias}
    LayerNorm/{scale, bias}                          (the final one)
    lm_head/...                                      (as bert_flax)
"""

from __future__ import annotations

import flax.linen as nn

from mlmtool.models.bert_flax import Embeddings, MLMHead, SelfAttention, _Base
from mlmtool.models.layers import ACTIVATIONS, LayerStack, layer_norm
from mlmtool.models.network import MaskedLMBase


class Output(_Base):
    """HF ``*SelfOutput`` / ``*Output``: dense, dropout, add the residual (no norm after it)."""

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        x = self.dense(self.config.hidden_size, "dense")(x)
        return residual + self.dropout_layer(self.config.hidden_dropout_prob)(x, deterministic=deterministic)


class Attention(_Base):
    """HF ``RobertaPreLayerNormAttention``: LayerNorm, ``self``, ``output`` onto the un-normed input."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        context = SelfAttention(**self.kw, name="self")(self.layer_norm("LayerNorm")(x), attention_mask, deterministic)
        return Output(**self.kw, name="output")(context, x, deterministic)


class Intermediate(_Base):
    """HF ``RobertaPreLayerNormIntermediate``: LayerNorm, dense, activation."""

    @nn.compact
    def __call__(self, x):
        x = self.dense(self.config.intermediate_size, "dense")(self.layer_norm("LayerNorm")(x))
        return ACTIVATIONS[self.config.hidden_act](x)


class Layer(_Base):
    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        x = Attention(**self.kw, name="attention")(x, attention_mask, deterministic)
        return Output(**self.kw, name="output")(Intermediate(**self.kw, name="intermediate")(x), x, deterministic)


class Encoder(_Base):
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        return LayerStack(Layer, self.kw, self.config.num_hidden_layers, remat=self.remat, scan=self.scan,
                          name="layer")(x, attention_mask, deterministic)


class MaskedLM(MaskedLMBase):
    """Pre-norm RoBERTa with its MLM head; the call is ``MaskedLMBase``'s."""

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        self.encoder = Encoder(**self.kw, remat=self.remat, scan=self.scan)
        self.LayerNorm = layer_norm(self.config.layer_norm_eps, param_dtype=self.param_dtype)
        self.lm_head = MLMHead(**self.kw)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, token_type_ids, deterministic, positions)  # [B, L, H]
        return self.LayerNorm(self.encoder(x, attention_mask, deterministic))  # [B, L, H]

    def logits(self, x):
        return self.lm_head(x, self.embeddings.word_embeddings.embedding)
