"""The BERT-family masked-language model in Flax (linen), readable top to bottom.

Computed exactly like the Hugging Face transformers (v5) PyTorch classes
``RobertaForMaskedLM`` / ``BertForMaskedLM`` / ``XLMRobertaForMaskedLM`` /
``CamembertForMaskedLM`` (tests check logit-for-logit parity); the parameter tree mirrors
their ``state_dict`` names (``mlmtool.models.bert.BertFamily.weight_table`` is the rename
table).  Parameter tree (``H`` hidden, ``I`` intermediate, ``V`` vocab)::

    embeddings/word_embeddings/embedding          [V, H]   (tied: also the MLM decoder)
    embeddings/position_embeddings/embedding      [max_position_embeddings, H]
    embeddings/token_type_embeddings/embedding    [type_vocab_size, H]
    embeddings/LayerNorm/{scale, bias}            [H]
    encoder/layer/<i>/attention/self/{query,key,value}/{kernel [H, H], bias [H]}
    encoder/layer/<i>/attention/output/dense/{kernel [H, H], bias [H]}
    encoder/layer/<i>/attention/output/LayerNorm/{scale, bias}
    encoder/layer/<i>/intermediate/dense/{kernel [H, I], bias [I]}
    encoder/layer/<i>/output/dense/{kernel [I, H], bias [H]}
    encoder/layer/<i>/output/LayerNorm/{scale, bias}
    lm_head/dense/{kernel [H, H], bias [H]}
    lm_head/layer_norm/{scale, bias}               [H]
    lm_head/bias                                   [V]

Mixed precision: ``dtype`` is the computation dtype of every Dense/Embed (bfloat16 on
accelerators), ``param_dtype`` the storage dtype of the master weights (float32).  LayerNorm
statistics and outputs, the attention softmax, the residual stream and the logits stay in
float32 — the same split as PyTorch autocast, which is what HF/MosaicBERT bf16 training does.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from mlmtool.models.layers import ACTIVATIONS, LayerStack, attention, embedding_init, layer_norm
from mlmtool.models.network import MaskedLMBase, SubModule, tied_logits


class _Base(SubModule):
    def layer_norm(self, name: str | None) -> nn.LayerNorm:
        return layer_norm(self.config.layer_norm_eps, param_dtype=self.param_dtype, name=name)


class Embeddings(_Base):
    """HF ``RobertaEmbeddings`` / ``BertEmbeddings``: word + token type + position, LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        # The padding row of the positions is only zeroed for RoBERTa, whose padded tokens
        # all sit at position pad_token_id (HF: nn.Embedding(..., padding_idx=pad_token_id)).
        position_pad = cfg.pad_token_id if cfg.variant.roberta else None
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = embed(cfg.vocab_size, cfg.hidden_size,
                                     embedding_init=embedding_init(cfg.initializer_range, cfg.pad_token_id))
        self.position_embeddings = embed(cfg.max_position_embeddings, cfg.hidden_size,
                                         embedding_init=embedding_init(cfg.initializer_range, position_pad))
        self.token_type_embeddings = embed(cfg.type_vocab_size, cfg.hidden_size,
                                           embedding_init=embedding_init(cfg.initializer_range, None))
        self.LayerNorm = self.layer_norm("LayerNorm")
        self.dropout = self.dropout_layer(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool, positions=None):
        cfg = self.config
        if cfg.variant.roberta:
            # fairseq make_positions / HF create_position_ids_from_input_ids: real tokens get
            # pad_token_id + 1, + 2, ...; padding keeps pad_token_id.  Under document
            # attention (``positions``, from 0 in each document) the count restarts at each one.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)  # [B, L]
            counted = jnp.cumsum(not_pad, axis=1) if positions is None else positions + 1
            position_ids = counted * not_pad + cfg.pad_token_id  # [B, L]
        elif positions is not None:
            position_ids = positions  # [B, L]: from 0 in each document
        else:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]  # [1, L]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # [B, L, H]
        x = self.LayerNorm(x)
        return self.dropout(x, deterministic=deterministic)


class SelfAttention(_Base):
    """HF ``attention.self``: multi-head scaled dot-product attention (no output projection)."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def project(name):
            # [B, L, H] -> [B, L, N, D]
            return self.dense(cfg.hidden_size, name)(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)

        q, k, v = project("query"), project("key"), project("value")
        rate = cfg.attention_probs_dropout_prob
        dropout = None
        if not (deterministic or rate == 0.0):
            dropout = functools.partial(self.dropout_layer(rate), deterministic=False)
        out = attention(q, k, v, attention_mask, kernels=self.kernels, dropout=dropout)  # [B, L, N, D]
        return out.reshape(batch, length, cfg.hidden_size)  # [B, L, N, D] -> [B, L, H]


class ResidualOutput(_Base):
    """HF ``attention.output`` and ``output``: dense, dropout, add the residual, post-LN."""

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        x = self.dense(self.config.hidden_size, "dense")(x)
        x = self.dropout_layer(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
        return self.layer_norm("LayerNorm")(x + residual)


class Attention(_Base):
    """HF ``attention``: ``self`` (attention) followed by ``output`` (projection + add & norm)."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        context = SelfAttention(**self.kw, name="self")(x, attention_mask, deterministic)
        return ResidualOutput(**self.kw, name="output")(context, x, deterministic)


class Intermediate(_Base):
    """HF ``intermediate``: the feed-forward up-projection and activation."""

    @nn.compact
    def __call__(self, x):
        x = self.dense(self.config.intermediate_size, "dense")(x)
        return ACTIVATIONS[self.config.hidden_act](x)


class EncoderLayer(_Base):
    """One post-LN transformer block (Vaswani et al. 2017, as used by BERT)."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        x = Attention(**self.kw, name="attention")(x, attention_mask, deterministic)
        h = Intermediate(**self.kw, name="intermediate")(x)
        return ResidualOutput(**self.kw, name="output")(h, x, deterministic)


class Encoder(_Base):
    """HF ``encoder``: the ``layer`` ModuleList (blocks "0", "1", ...)."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        return LayerStack(EncoderLayer, self.kw, self.config.num_hidden_layers, remat=self.remat, scan=self.scan,
                          name="layer")(x, attention_mask, deterministic)


class MLMHead(_Base):
    """HF ``RobertaLMHead`` / ``BertLMPredictionHead``: dense, activation, LayerNorm, tied decoder.

    Hugging Face's RoBERTa head hard-codes the exact GELU whatever ``hidden_act`` says; BERT's
    uses ``hidden_act``.  We do the same so that weights move between the two unchanged.
    """

    @nn.compact
    def __call__(self, x, word_embeddings):
        cfg = self.config
        act = ACTIVATIONS["gelu" if cfg.variant.roberta else cfg.hidden_act]
        x = self.dense(cfg.hidden_size, "dense")(x)
        x = self.layer_norm("layer_norm")(act(x))
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), self.param_dtype)
        return tied_logits(x, word_embeddings, bias, self.dtype)  # [..., V]


class MaskedLM(MaskedLMBase):
    """BERT/RoBERTa encoder with the masked-language-model head (HF ``*ForMaskedLM``); the
    call, its inputs and ``kernels``/``remat``/``scan_layers`` are ``MaskedLMBase``'s."""

    def setup(self):
        self.embeddings = Embeddings(**self.kw)
        self.encoder = Encoder(**self.kw, remat=self.remat, scan=self.scan)
        self.lm_head = MLMHead(**self.kw)

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        x = self.embeddings(input_ids, token_type_ids, deterministic, positions)  # [B, L, H]
        return self.encoder(x, attention_mask, deterministic)  # [B, L, H]

    def logits(self, x):
        return self.lm_head(x, self.embeddings.word_embeddings.embedding)
