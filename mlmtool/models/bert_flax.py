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
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mlmtool.errors import ConfigError
from mlmtool.kernels import Kernels, select as select_kernels
from mlmtool.models.bert import BertConfig
from mlmtool.models.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
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
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    @property
    def kw(self) -> dict:
        """The attributes every submodule shares."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)

    def dense(self, features: int, name: str) -> Dense:
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=normal_init(self.config.initializer_range), form=self.kernels.dense, name=name)

    def dropout_layer(self, rate: float) -> Dropout:
        return Dropout(rate, form=self.kernels.dropout)

    def layer_norm(self, name: str) -> nn.LayerNorm:
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

    def __call__(self, input_ids, token_type_ids, deterministic: bool, segment_ids=None):
        cfg = self.config
        if cfg.variant.roberta:
            # fairseq make_positions / HF create_position_ids_from_input_ids: real tokens get
            # pad_token_id + 1, + 2, ...; padding keeps pad_token_id.  With segment_ids the
            # count restarts at each document.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)  # [B, L]
            counted = jnp.cumsum(not_pad, axis=1) if segment_ids is None else segment_positions(segment_ids) + 1
            position_ids = counted * not_pad + cfg.pad_token_id  # [B, L]
        elif segment_ids is not None:
            position_ids = segment_positions(segment_ids)  # [B, L]: from 0 in each document
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
        # Decoder tied to the word embeddings: x @ E.T, accumulated in float32.
        logits = jnp.einsum("...h,vh->...v", x.astype(self.dtype), word_embeddings.astype(self.dtype),
                            preferred_element_type=jnp.float32)  # [..., V]
        return logits + bias.astype(jnp.float32)


class MaskedLM(nn.Module):
    """BERT/RoBERTa encoder with the masked-language-model head (HF ``*ForMaskedLM``).

    ``kernels`` (None: ``mlmtool.kernels.select`` for jax's default backend and ``dtype``),
    ``remat`` (a REMAT_POLICIES key) and ``scan_layers`` (None: scan when ``remat`` is on)
    change how the network is computed, never the parameters or the function: checkpoints
    and exports are interchangeable."""

    config: BertConfig
    dtype: Any = jnp.float32  # computation dtype (float32 or bfloat16)
    param_dtype: Any = jnp.float32  # master weights always float32
    kernels: Kernels | None = None
    remat: str = "none"
    scan_layers: bool | None = None  # None: scan exactly when gradient checkpointing is on

    def setup(self):
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"unknown gradient checkpointing policy {self.remat!r}",
                              hint=f"use one of {', '.join(REMAT_POLICIES)}")
        kernels = self.kernels or select_kernels(dtype=jnp.dtype(self.dtype).name, head_dim=self.config.head_dim)
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=kernels)
        self.embeddings = Embeddings(**kw)
        # Rematerialisation pays off under the scan: XLA's scheduler keeps one layer's
        # recomputation at a time there, while across unrolled layers it saved 7% of the
        # activation memory where the scan saved 78% (docs/benchmarks.md, "Memory").
        scan = self.remat != "none" if self.scan_layers is None else self.scan_layers
        self.encoder = Encoder(**kw, remat=self.remat, scan=scan)
        self.lm_head = MLMHead(**kw)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, masked_positions=None, segment_ids=None):
        """input_ids/attention_mask/token_type_ids int [B, L]. Returns float32 logits:
        [B, L, V] when masked_positions is None, else [G, P, V] at the int32 positions
        masked_positions [G, P] (see ``layers.gather_masked``: the head runs only there).
        Rows with fewer masks pad with any valid position and the caller weights those out
        of the loss.  Dropout uses the 'dropout' rng when deterministic=False.

        attention_mask defaults to all ones and token_type_ids to zeros, as in HF.  With the
        cuDNN attention kernel (bfloat16 on NVIDIA GPUs) padding must be on the right.

        segment_ids int [B, L] (document attention, ``layers.document_segments``; 0 and
        attention_mask's False are padding): each document packed in a row attends only to
        itself and its positions start over, so a row computes what each document alone would.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_sequence_length:
            raise ConfigError(
                f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                f"{cfg.max_sequence_length} (max_position_embeddings={cfg.max_position_embeddings})",
                hint="use shorter sequences or a model with more position embeddings",
            )
        attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None \
            else jnp.asarray(attention_mask).astype(bool)  # [B, L]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if segment_ids is not None:  # the encoder's mask becomes the segment ids (layers.attention)
            segment_ids = jnp.where(attention_mask, jnp.asarray(segment_ids, jnp.int32), 0)  # [B, L]
            attention_mask = segment_ids

        x = self.embeddings(input_ids, token_type_ids, deterministic, segment_ids)  # [B, L, H]
        x = self.encoder(x, attention_mask, deterministic)  # [B, L, H]
        if masked_positions is not None:
            x = gather_masked(x, masked_positions)  # [G, P, H]
        return self.lm_head(x, self.embeddings.word_embeddings.embedding)  # [B, L, V] or [G, P, V]
