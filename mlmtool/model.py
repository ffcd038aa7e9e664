"""A BERT/RoBERTa masked-language model in Flax (linen), readable top to bottom.

References:
  * BERT: Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for
    Language Understanding", arXiv:1810.04805.
  * RoBERTa: Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining Approach",
    arXiv:1907.11692.  Same network as BERT; the differences that matter here are the
    position ids (counted from ``pad_token_id + 1``, padding keeps position ``pad_token_id``),
    a single token type and, in Hugging Face's head, a hard-coded exact GELU.

The network is computed exactly like the Hugging Face transformers (v5) PyTorch classes
``RobertaForMaskedLM`` / ``BertForMaskedLM`` (the tests check logit-for-logit parity), and the
parameter tree mirrors their ``state_dict`` names, so ``mlmtool.hf_weights`` is a rename plus a
transpose of the Dense kernels.  Parameter tree (``H`` hidden, ``I`` intermediate, ``V`` vocab)::

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

Usage::

    config = ModelConfig.from_json_file("config.json")
    params = init_params(config, jax.random.PRNGKey(0))
    logits = MaskedLM(config).apply({"params": params}, input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.errors import ConfigError
from mlmtool.kernels import Kernels, select as select_kernels

SUPPORTED_MODEL_TYPES = ("roberta", "bert")

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture, with Hugging Face ``config.json`` field names.

    Defaults are RoBERTa-base's (Liu et al. 2019) except the sizes, which have none on purpose.
    """

    model_type: str  # "roberta" | "bert"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # 4 * hidden_size in BERT/RoBERTa
    hidden_act: str = "gelu"  # exact erf GELU, as BERT and RoBERTa were trained
    hidden_dropout_prob: float = 0.1  # BERT/RoBERTa pre-training value
    attention_probs_dropout_prob: float = 0.1  # ditto
    max_position_embeddings: int = 514  # RoBERTa: 512 tokens + pad_token_id + 1 offset
    type_vocab_size: int = 1  # RoBERTa has no segment embeddings to speak of (BERT: 2)
    layer_norm_eps: float = 1e-5  # RoBERTa/fairseq (BERT: 1e-12)
    initializer_range: float = 0.02  # std of the normal init (BERT/RoBERTa)
    pad_token_id: int = 1  # RoBERTa's <pad> (BERT: 0)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}",
                hint=f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}",
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}",
                hint=f"use one of {', '.join(ACTIVATIONS)}",
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ConfigError(f"initializer_range must be positive, got {self.initializer_range!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})"
            )
        if self.model_type == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
            raise ConfigError(
                f"max_position_embeddings {self.max_position_embeddings} leaves no positions: "
                f"RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table allows (RoBERTa loses pad_token_id + 1 slots)."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict; unknown keys are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        if "model_type" not in d:
            raise ConfigError("config has no model_type", hint="add \"model_type\": \"roberta\" or \"bert\"")
        if d["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {d['model_type']!r}",
                hint=f"use one of {', '.join(SUPPORTED_MODEL_TYPES)}",
            )
        # Features of the HF classes this model does not implement: refuse rather than
        # silently computing something else.
        if d.get("tie_word_embeddings", True) is False:
            raise ConfigError("tie_word_embeddings=false is not supported (the MLM decoder is tied)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(
                f"position_embedding_type {d['position_embedding_type']!r} is not supported",
                hint="only absolute position embeddings are implemented",
            )
        if d.get("is_decoder", False):
            raise ConfigError("is_decoder=true is not supported (this is a bidirectional encoder)")

        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in d:
                if field.default is dataclasses.MISSING:
                    raise ConfigError(f"config is missing required field {field.name!r}")
                continue
            value = d[field.name]
            kind = {"int": int, "float": float, "str": str}[field.type]
            ok = (
                isinstance(value, str) if kind is str
                else isinstance(value, int) and not isinstance(value, bool) if kind is int
                else isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            if not ok:
                raise ConfigError(f"config field {field.name!r} must be {field.type}, got {value!r}")
            kwargs[field.name] = kind(value)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict:
        """A ``config.json`` dict that ``transformers.AutoConfig`` / ``AutoModelForMaskedLM`` load."""
        arch = {"roberta": "RobertaForMaskedLM", "bert": "BertForMaskedLM"}[self.model_type]
        return {
            "architectures": [arch],
            **self.to_dict(),
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
        }

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# --------------------------------------------------------------------------- initialisers


def _normal(std: float):
    """HF ``_init_weights``: every Linear kernel and Embedding table ~ N(0, std)."""
    return nn.initializers.normal(stddev=std)


def _embedding_init(std: float, padding_idx: int | None):
    """N(0, std) with the ``padding_idx`` row zeroed, like ``nn.Embedding(padding_idx=...)`` in HF."""
    normal = nn.initializers.normal(stddev=std)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)
        return table if padding_idx is None else table.at[padding_idx].set(0)

    return init


# --------------------------------------------------------------------------- building blocks
#
# Dense and Dropout are nn.Dense / nn.Dropout with the same parameters, initialisation and
# semantics, written for speed on XLA:CPU, where the training step was measured (see
# docs/benchmarks.md, "Training", for the numbers behind each choice).


class Dense(nn.Module):
    """``nn.Dense`` (same parameter names, shapes and initialisation), with the matmul's form
    chosen per backend (``mlmtool.kernels``):

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

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.form == "flat":
            y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)  # [N, in] @ [in, out] -> [N, out]
            y = y.reshape(*x.shape[:-1], self.features)  # [N, out] -> [..., out]
        else:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))  # [..., out]
        return y + bias.astype(self.dtype)


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

    ``form`` (``mlmtool.kernels``): ``"fused-threefry"`` draws nn.Dropout's generator
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
    return key.shape[-1:] == (2,) and jax.config.jax_default_prng_impl == "threefry2x32"


# --------------------------------------------------------------------------- modules

# Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
# arXiv:1604.06174), per encoder layer: what the backward pass keeps of each layer's forward.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation: keep every activation (fastest, most memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
}


class _Base(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    @property
    def kw(self) -> dict:
        """The attributes every submodule shares."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)

    def dense(self, features: int, name: str) -> Dense:
        return Dense(
            features,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_normal(self.config.initializer_range),
            bias_init=nn.initializers.zeros,
            form=self.kernels.dense,
            name=name,
        )

    def dropout_layer(self, rate: float) -> Dropout:
        return Dropout(rate, form=self.kernels.dropout)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        # Float32 output; use_fast_variance=False computes var as E[(x - mean)^2] like torch.
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            name=name,
        )


class Embeddings(_Base):
    """HF ``RobertaEmbeddings`` / ``BertEmbeddings``: word + token type + position, LayerNorm, dropout."""

    def setup(self):
        cfg = self.config
        # The padding row of the positions is only zeroed for RoBERTa, whose padded tokens
        # all sit at position pad_token_id (HF: nn.Embedding(..., padding_idx=pad_token_id)).
        position_pad = cfg.pad_token_id if cfg.model_type == "roberta" else None
        embed = functools.partial(nn.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embeddings = embed(
            cfg.vocab_size, cfg.hidden_size,
            embedding_init=_embedding_init(cfg.initializer_range, cfg.pad_token_id),
        )
        self.position_embeddings = embed(
            cfg.max_position_embeddings, cfg.hidden_size,
            embedding_init=_embedding_init(cfg.initializer_range, position_pad),
        )
        self.token_type_embeddings = embed(
            cfg.type_vocab_size, cfg.hidden_size,
            embedding_init=_embedding_init(cfg.initializer_range, None),
        )
        self.LayerNorm = self.layer_norm("LayerNorm")
        self.dropout = self.dropout_layer(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        cfg = self.config
        if cfg.model_type == "roberta":
            # fairseq make_positions / HF create_position_ids_from_input_ids: real tokens get
            # pad_token_id + 1, + 2, ...; padding keeps pad_token_id.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)  # [B, L]
            position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id  # [B, L]
        else:
            position_ids = jnp.arange(input_ids.shape[1])[None, :]  # [1, L]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # [B, L, H]
        x = self.LayerNorm(x)
        return self.dropout(x, deterministic=deterministic)


class SelfAttention(_Base):
    """HF ``attention.self``: multi-head scaled dot-product attention (no output projection).

    ``attention_mask`` is the bool key padding mask [B, L]; the kernel (``mlmtool.kernels``)
    decides the form it takes: a [B, 1, 1, L] mask for XLA, per-row key lengths for cuDNN
    (rows padded on the right)."""

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name):
            # [B, L, H] -> [B, L, N, D]
            return self.dense(cfg.hidden_size, name)(x).reshape(batch, length, heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        rate = cfg.attention_probs_dropout_prob
        mask = attention_mask[:, None, None, :]  # keys a query may attend to: [B, L] -> [B, 1, 1, L]
        if not (deterministic or rate == 0.0):
            # Neither fused entry point has dropout: spell attention out when training with it.
            scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
            scores = scores * head_dim**-0.5  # [B, N, L, L], scaled as in Vaswani et al.
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1)  # float32 softmax
            probs = self.dropout_layer(rate)(probs, deterministic=False)
            out = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v)  # [B, L, N, D]
        elif self.kernels.attention == "cudnn":
            # cuDNN flash attention; its PADDING mask: keys past each row's length are ignored.
            lengths = jnp.sum(attention_mask, axis=-1, dtype=jnp.int32)  # [B]
            out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                               implementation="cudnn")  # [B, L, N, D]
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")  # [B, L, N, D]
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


class LayerStack(_Base):
    """HF's ``encoder.layer`` ModuleList: blocks named "0", "1", ... so params read layer/<i>/...

    ``remat`` is the gradient-checkpointing policy of each layer (REMAT_POLICIES).  With
    ``scan`` the layers run as one ``lax.scan`` over their weights stacked on the fly: XLA
    compiles one layer instead of ``num_hidden_layers``, and the parameter tree (checkpoints,
    optimizer state, the export) stays exactly the unrolled one.  Both give the same logits;
    in training their dropout masks differ (the scan folds the layer index into the key).
    """

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        policy = REMAT_POLICIES[self.remat]
        if self.scan and not self.is_initializing():
            return self._scanned(x, attention_mask, deterministic, policy)
        layer = EncoderLayer if self.remat == "none" else nn.remat(EncoderLayer, policy=policy, static_argnums=(3,))
        for i in range(self.config.num_hidden_layers):
            x = layer(**self.kw, name=str(i))(x, attention_mask, deterministic)
        return x

    def _scanned(self, x, attention_mask, deterministic: bool, policy):
        n = self.config.num_hidden_layers
        layers = [self.variables["params"][str(i)] for i in range(n)]
        stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *layers)  # each leaf [n, ...]
        block = EncoderLayer(**self.kw, parent=None)  # unbound: applied to one layer's weights
        dropout_key = None if deterministic else self.make_rng("dropout")

        def body(h, weights_and_index):
            weights, i = weights_and_index
            rngs = {} if dropout_key is None else {"dropout": jax.random.fold_in(dropout_key, i)}
            return block.apply({"params": weights}, h, attention_mask, deterministic, rngs=rngs), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # no CSE to prevent inside a scan
        x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(n)))  # [B, L, H]
        return x


class Encoder(_Base):
    """HF ``encoder``."""

    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        return LayerStack(**self.kw, remat=self.remat, scan=self.scan, name="layer")(x, attention_mask, deterministic)


class MLMHead(_Base):
    """HF ``RobertaLMHead`` / ``BertLMPredictionHead``: dense, activation, LayerNorm, tied decoder.

    Hugging Face's RoBERTa head hard-codes the exact GELU whatever ``hidden_act`` says; BERT's
    uses ``hidden_act``.  We do the same so that weights move between the two unchanged.
    """

    @nn.compact
    def __call__(self, x, word_embeddings):
        cfg = self.config
        act = ACTIVATIONS["gelu" if cfg.model_type == "roberta" else cfg.hidden_act]
        x = self.dense(cfg.hidden_size, "dense")(x)
        x = self.layer_norm("layer_norm")(act(x))
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), self.param_dtype)
        # Decoder tied to the word embeddings: x @ E.T, accumulated in float32.
        logits = jnp.einsum(
            "...h,vh->...v",
            x.astype(self.dtype),
            word_embeddings.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )  # [..., V]
        return logits + bias.astype(jnp.float32)


class MaskedLM(nn.Module):
    """BERT/RoBERTa encoder with the masked-language-model head (HF ``*ForMaskedLM``).

    ``kernels`` (None: ``mlmtool.kernels.select`` for jax's default backend and ``dtype``),
    ``remat`` (a REMAT_POLICIES key) and ``scan_layers`` (None: scan when ``remat`` is on)
    change how the network is computed, never the parameters or the function: checkpoints
    and exports are interchangeable."""

    config: ModelConfig
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
                 deterministic: bool = True, masked_positions=None):
        """input_ids/attention_mask/token_type_ids int [B, L]. Returns float32 logits:
        [B, L, V] when masked_positions is None, else [B, P, V] for the int32 positions
        masked_positions [B, P] (the final hidden states are gathered at those positions
        BEFORE the MLM head, so the head runs only on P << L positions, as MosaicBERT does).
        Positions must lie in [0, L); rows with fewer masks pad with any valid position and
        the caller weights those out of the loss.  masked_positions may also be [G, P] for G
        groups of B / G consecutive rows that share their P slots (positions then index the
        group's rows laid end to end, [0, B / G * L)): a group needs fewer slots per row than
        a single row for the same overflow odds.  The logits are then [G, P, V].
        Dropout uses the 'dropout' rng when deterministic=False.

        attention_mask defaults to all ones and token_type_ids to zeros, as in HF.  With the
        cuDNN attention kernel (bfloat16 on NVIDIA GPUs) padding must be on the right.
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

        x = self.embeddings(input_ids, token_type_ids, deterministic)  # [B, L, H]
        x = self.encoder(x, attention_mask, deterministic)  # [B, L, H]
        if masked_positions is not None:
            masked_positions = jnp.asarray(masked_positions)
            groups = masked_positions.shape[0]
            if masked_positions.ndim != 2 or x.shape[0] % groups:
                raise ValueError(f"masked_positions must be [G, P] with G dividing the batch size "
                                 f"{x.shape[0]}, got shape {masked_positions.shape}")
            x = x.reshape(groups, -1, x.shape[-1])  # [G, B / G * L, H]
            # gathered at [G, P] -> [G, P, H]
            x = jnp.take_along_axis(x, masked_positions[:, :, None], axis=1)
        return self.lm_head(x, self.embeddings.word_embeddings.embedding)  # [B, L, V] or [G, P, V]


# --------------------------------------------------------------------------- helpers


def _init_variables(config: ModelConfig, rng):
    # A [1, 2] dummy batch is enough: no parameter shape depends on the sequence length.
    dummy = jnp.zeros((1, 2), jnp.int32)
    return MaskedLM(config).init(rng, dummy)


def init_params(config: ModelConfig, rng) -> dict:
    """Fresh float32 parameters initialised like HF ``_init_weights``.

    ``rng`` is a ``jax.random`` key or an int seed.  Returns the params dict (the contents
    of the ``"params"`` collection): ``MaskedLM(config).apply({"params": params}, ...)``.
    """
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.PRNGKey(int(rng))
    return jax.jit(functools.partial(_init_variables, config))(rng)["params"]


def count_params(config: ModelConfig) -> int:
    """Number of parameters (the tied decoder counted once), without allocating any."""
    shapes = jax.eval_shape(functools.partial(_init_variables, config), jax.random.PRNGKey(0))
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree_util.tree_leaves(shapes)))
