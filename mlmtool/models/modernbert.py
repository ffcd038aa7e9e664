"""The ModernBERT family (Warner et al. 2024, "Smarter, Better, Faster, Longer: A Modern
Bidirectional Encoder for Fast, Memory Efficient, and Long Context Finetuning and Inference",
arXiv:2412.13663): a pre-norm encoder with rotary position embeddings (Su et al. 2021,
arXiv:2104.09864), GeGLU feed-forward layers (Shazeer 2020, arXiv:2002.05202), no biases by
default, and layers that alternate sliding-window ("local") and full ("global") attention,
each kind with its own RoPE theta.

This module holds the jax-free facts (config, presets, weight table, parameter count,
tokenizer conventions); the network is ``mlmtool.models.modernbert_flax``.  The reference is
transformers v5's ``ModernBertForMaskedLM`` (tests check logit-for-logit parity).

The config.json fields, as transformers v5 reads them:

* ``layer_types``: one of "sliding_attention" / "full_attention" per layer.  Hub configs
  written before v5 carry ``global_attn_every_n_layers`` instead (layer i is global when
  i % n == 0; default 3), used only when ``layer_types`` is absent, as transformers does.
* ``rope_parameters``: {"full_attention": {"rope_type": "default", "rope_theta": ...},
  "sliding_attention": {...}}; older configs carry ``global_rope_theta`` /
  ``local_rope_theta``, used for a layer kind whose ``rope_theta`` is not given (defaults
  160000 and 10000).  Only the "default" RoPE (no scaling) is implemented.
* ``local_attention``: the total window of the sliding layers: a query sees the keys at most
  ``local_attention // 2`` positions away on either side (transformers' ``sliding_window``;
  a ``sliding_window`` field, if present, sets ``local_attention`` to twice it, as there).
* ``attention_bias`` (Wqkv, attention Wo), ``mlp_bias`` (Wi, Wo), ``norm_bias`` (every
  LayerNorm), ``classifier_bias`` (the head's dense), ``decoder_bias`` (the decoder's bias).
* ``classifier_activation``: the head's activation (the MLM head is the "prediction head"
  the classifiers share); ``hidden_activation``: the GeGLU's.
"""

from __future__ import annotations

import dataclasses
import json

from mlmtool.errors import ConfigError
from mlmtool.models.base import (
    Family,
    FamilyConfig,
    SpecialTokens,
    TokenizerDefaults,
    WeightEntry,
    WeightTable,
    config_fields,
    dense_entries,
    is_int,
    is_number,
    norm_entries,
    refuse,
    require_model_type,
    require_numbers,
    require_positive_ints,
)
from mlmtool.models.bert import ACTIVATION_NAMES

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
DEFAULT_THETA = {FULL: 160_000.0, SLIDING: 10_000.0}  # transformers' ModernBertConfig.default_theta
LEGACY_THETA_KEYS = {FULL: "global_rope_theta", SLIDING: "local_rope_theta"}
BOOL_FIELDS = ("norm_bias", "attention_bias", "mlp_bias", "decoder_bias", "classifier_bias")


def layer_types_every(num_layers: int, every: int = 3) -> list[str]:
    """transformers' legacy pattern: layer i is global (full attention) when i % every == 0."""
    return [SLIDING if i % every else FULL for i in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(FamilyConfig):
    """The architecture, with Hugging Face ``config.json`` field names (the RoPE thetas under
    their legacy names ``global_rope_theta`` / ``local_rope_theta``, so that the dataclass
    stays hashable and ``dataclasses.asdict`` of it parses back to the same config).

    Defaults are ModernBERT-base's except the sizes, which have none on purpose.  Build it
    with ``FAMILY.parse_config`` (it resolves ``layer_types`` and ``rope_parameters``)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # GeGLU width: Wi projects to 2 x this
    layer_types: tuple[str, ...]
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    attention_bias: bool = False
    attention_dropout: float = 0.0
    global_rope_theta: float = DEFAULT_THETA[FULL]
    local_rope_theta: float = DEFAULT_THETA[SLIDING]
    local_attention: int = 128
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_activation: str = "gelu"

    @property
    def sliding_window(self) -> int:
        """Keys at most this far from the query on either side, in the sliding layers."""
        return self.local_attention // 2

    def rope_theta(self, layer_type: str) -> float:
        return self.global_rope_theta if layer_type == FULL else self.local_rope_theta

    @classmethod
    def from_dict(cls, d: dict) -> "ModernBertConfig":
        return FAMILY.parse_config(d)


# --------------------------------------------------------------------------- config parsing


def _resolve_layer_types(d: dict) -> tuple[str, ...]:
    layers = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        every = d.get("global_attn_every_n_layers", 3)
        if not is_int(every) or every <= 0:
            raise ConfigError(f"config global_attn_every_n_layers must be a positive integer, got {every!r}",
                              "fix it, or give layer_types instead")
        return tuple(layer_types_every(layers, every))
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        raise ConfigError(f"config layer_types must be a list of strings, got {types!r}",
                          f"use {FULL!r} / {SLIDING!r} per layer")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(f"config layer_types {', '.join(map(repr, bad))} is not supported",
                          f"use {FULL!r} or {SLIDING!r} for each layer")
    if len(types) != layers:
        pattern = json.dumps(layer_types_every(layers), separators=(",", ":"))
        raise ConfigError(f"config layer_types has {len(types)} entries but num_hidden_layers is {layers}",
                          f"give one per layer, e.g. --set 'layer_types={pattern}' (a global layer every 3rd, "
                          "as ModernBERT)")
    return tuple(types)


def _resolve_rope_theta(d: dict) -> dict[str, float]:
    """The RoPE theta per layer kind, as transformers' ``convert_rope_params_to_dict``."""
    refuse(d, "rope_scaling", (None,), "only the default RoPE, without scaling, is implemented")
    params = d.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"config rope_parameters must be an object, got {params!r}",
                          f"use {{{FULL!r}: {{'rope_theta': ...}}, {SLIDING!r}: {{...}}}}")
    unknown = sorted(set(params) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"config rope_parameters key {unknown[0]!r} is not supported (ModernBERT's RoPE "
                          "parameters are given per layer kind)",
                          f"nest them under {FULL!r} and {SLIDING!r}")
    out = {}
    for kind in LAYER_TYPES:
        p = params.get(kind) or {}
        if not isinstance(p, dict):
            raise ConfigError(f"config rope_parameters[{kind!r}] must be an object, got {p!r}")
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config rope_parameters[{kind!r}] rope_type {rope_type!r} is not supported "
                              "(only the default RoPE is implemented)", "use rope_type 'default'")
        factor = p.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ConfigError(f"config rope_parameters[{kind!r}] partial_rotary_factor {factor!r} is not "
                              "supported (transformers' ModernBERT rotates the whole head)",
                              "remove partial_rotary_factor")
        legacy = LEGACY_THETA_KEYS[kind]
        theta = p.get("rope_theta", d.get(legacy, DEFAULT_THETA[kind]))
        if not is_number(theta) or theta <= 0:
            where = f"rope_parameters[{kind!r}]['rope_theta']" if "rope_theta" in p else legacy
            raise ConfigError(f"config {where} must be a positive number, got {theta!r}")
        out[kind] = float(theta)
    return out


def _check_bools(d: dict) -> None:
    for key in BOOL_FIELDS:
        if key in d and not isinstance(d[key], bool):
            raise ConfigError(f"config {key} must be true or false, got {d[key]!r}", f"fix it with --set {key}=false")


def _check_activation(d: dict, key: str) -> None:
    act = d.get(key, "gelu")
    if not isinstance(act, str) or act not in ACTIVATION_NAMES:
        raise ConfigError(f"unsupported {key} {act!r}", hint=f"use one of {', '.join(ACTIVATION_NAMES)}")


# --------------------------------------------------------------------------- presets

_IDS = dict(pad_token_id=50283, bos_token_id=50281, eos_token_id=50282, cls_token_id=50281, sep_token_id=50282)
# answerdotai/ModernBERT-base's config.json (what transformers v5 reads from it): 22 layers,
# hidden 768, 12 heads, GeGLU 1152, a global layer every 3rd, window 128, vocab 50368.
_BASE = dict(
    model_type="modernbert", architectures=["ModernBertForMaskedLM"], vocab_size=50368, hidden_size=768,
    intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12, hidden_activation="gelu",
    max_position_embeddings=8192, initializer_range=0.02, initializer_cutoff_factor=2.0, norm_eps=1e-5,
    norm_bias=False, local_attention=128, layer_types=layer_types_every(22),
    rope_parameters={FULL: {"rope_theta": 160000.0, "rope_type": "default"},
                     SLIDING: {"rope_theta": 10000.0, "rope_type": "default"}},
    classifier_pooling="mean", **_IDS,
)
# answerdotai/ModernBERT-large: 28 layers, hidden 1024, 16 heads, GeGLU 2624.
_LARGE = dict(hidden_size=1024, intermediate_size=2624, num_hidden_layers=28, num_attention_heads=16,
              layer_types=layer_types_every(28))
# CPU sizes.  The special ids are those 'mlmtool tokenizer' gives (MODERNBERT_SPECIALS' order),
# inside the small vocabulary.
_SMALL_IDS = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
_SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
              layer_types=layer_types_every(6), **_SMALL_IDS)
_TINY = dict(vocab_size=8192, hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=2,
             local_attention=64, layer_types=layer_types_every(4), **_SMALL_IDS)

#: AutoConfig.for_model("modernbert").to_dict() of transformers 5 (tests/test_presets.py)
_HF_DEFAULTS = dict(
    architectures=None, attention_bias=False, attention_dropout=0.0, bos_token_id=50281, chunk_size_feed_forward=0,
    classifier_activation="gelu", classifier_bias=False, classifier_dropout=0.0, classifier_pooling="cls",
    cls_token_id=50281, decoder_bias=True, deterministic_flash_attn=False, dtype=None, embedding_dropout=0.0,
    eos_token_id=50282, hidden_activation="gelu", hidden_size=768, id2label={"0": "LABEL_0", "1": "LABEL_1"},
    initializer_cutoff_factor=2.0, initializer_range=0.02, intermediate_size=1152, is_encoder_decoder=False,
    label2id={"LABEL_0": 0, "LABEL_1": 1}, layer_types=layer_types_every(22), local_attention=128,
    max_position_embeddings=8192, mlp_bias=False, mlp_dropout=0.0, model_type="modernbert", norm_bias=False,
    norm_eps=1e-5, num_attention_heads=12, num_hidden_layers=22, output_attentions=False,
    output_hidden_states=False, pad_token_id=50283, problem_type=None, return_dict=True,
    rope_parameters={FULL: {"rope_theta": 160000.0, "rope_type": "default"},
                     SLIDING: {"rope_theta": 10000.0, "rope_type": "default"}},
    sep_token_id=50282, sparse_pred_ignore_index=-100, sparse_prediction=False, tie_word_embeddings=True,
    vocab_size=50368,
)

#: ModernBERT's special tokens ([UNK] [CLS] [SEP] [PAD] [MASK], in the relative order of their
#: ids 50280-50284 in answerdotai/ModernBERT-base's tokenizer), [MASK] with lstrip as there,
#: and BERT's ``[CLS] A [SEP] B [SEP]`` template.
MODERNBERT_SPECIALS = SpecialTokens(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                                    order=("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"), processor="bert",
                                    mask_lstrip=True)
_TOKENIZER = TokenizerDefaults("bpe", specials=MODERNBERT_SPECIALS,
                               config_ids=(("pad_token_id", "pad"), ("cls_token_id", "cls"), ("sep_token_id", "sep"),
                                           ("bos_token_id", "cls"), ("eos_token_id", "sep")),
                               clean_up_tokenization_spaces=True)  # answerdotai/ModernBERT-base's class and fields


class ModernBertFamily(Family):
    name = "modernbert"
    model_types = {"modernbert": "ModernBertForMaskedLM"}
    presets = {
        "modernbert-base": _BASE,
        "modernbert-large": {**_BASE, **_LARGE},
        "modernbert-small": {**_BASE, **_SMALL},
        "modernbert-tiny": {**_BASE, **_TINY},
    }
    preset_help = {
        "modernbert-base": "ModernBERT base, 150M params (HF answerdotai/ModernBERT-base)",
        "modernbert-large": "ModernBERT large, 396M params (HF answerdotai/ModernBERT-large)",
        "modernbert-small": "ModernBERT, 6 x 256, window 128, for CPU work",
        "modernbert-tiny": "ModernBERT, 4 x 128, window 64, for demos and tests",
    }
    hf_defaults = {"modernbert": _HF_DEFAULTS}
    tokenizer = {"modernbert": _TOKENIZER}
    network = "mlmtool.models.modernbert_flax:MaskedLM"
    head_modules = ("head", "decoder")
    document_attention = True  # segment_ids: attention inside each document, RoPE from 0 in each
    # ModernBERT's recipe trains with it; off by default here until the demo's recipe (measured
    # without it, docs/benchmarks.md's demo table) is measured with it: that row decides the default
    document_attention_default = False
    shape_fields = (("vocab_size", ("model", "embeddings", "tok_embeddings", "embedding"), 0),
                    ("hidden_size", ("model", "embeddings", "tok_embeddings", "embedding"), 1),
                    ("intermediate_size", ("model", "layers", "0", "mlp", "Wo", "kernel"), 0))
    layers_path = ("model", "layers")
    architecture_keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "hidden_activation", "layer_types", "rope_parameters",
                         "local_attention", "norm_eps", *BOOL_FIELDS, "classifier_activation")

    def derived_overrides(self, base: dict, fields: dict) -> dict:
        """A new ``num_hidden_layers`` (or ``global_attn_every_n_layers``) without ``layer_types``:
        the pattern is regenerated, a global layer every n-th (transformers' ModernBertConfig
        does the same when ``layer_types`` is not given)."""
        if "layer_types" in fields or not {"num_hidden_layers", "global_attn_every_n_layers"} & set(fields):
            return fields
        merged = {**base, **fields}
        every = merged.get("global_attn_every_n_layers", 3)
        layers = merged.get("num_hidden_layers")
        if not (is_int(layers) and is_int(every) and layers > 0 and every > 0):
            return fields  # parse_config names the bad value
        return {**fields, "layer_types": layer_types_every(layers, every)}

    def parse_config(self, d: dict) -> ModernBertConfig:
        """Build from a Hugging Face ``config.json`` dict; unknown keys are ignored (hub
        configs carry leftovers such as position_embedding_type, which transformers ignores)."""
        require_model_type(d, self.model_types)
        # Features of the HF classes this network does not implement: refuse rather than
        # silently computing something else.
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the token embeddings")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        require_positive_ints(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                  "intermediate_size"))
        require_positive_ints(d, ("max_position_embeddings", "local_attention"), default=1)
        require_numbers(d, ("initializer_range", "initializer_cutoff_factor", "norm_eps", "attention_dropout",
                            "embedding_dropout", "mlp_dropout"),
                        positive=("initializer_range", "initializer_cutoff_factor", "norm_eps"),
                        probability=("attention_dropout", "embedding_dropout", "mlp_dropout"))
        _check_bools(d)
        _check_activation(d, "hidden_activation")
        _check_activation(d, "classifier_activation")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                              "change one of them with --set")
        if (hidden // heads) % 2:
            raise ConfigError(f"the head size hidden_size / num_attention_heads = {hidden // heads} is odd: "
                              "rotary embeddings rotate pairs of dimensions", "change one of them with --set")
        if d.get("head_dim") is not None and d["head_dim"] != hidden // heads:
            raise ConfigError(f"config head_dim {d['head_dim']!r} is not hidden_size / num_attention_heads = "
                              f"{hidden // heads} (transformers' ModernBERT attention does not support that)",
                              "remove head_dim")
        pad = d.get("pad_token_id", 50283)
        if not is_int(pad) or not 0 <= pad < d["vocab_size"]:
            raise ConfigError(f"pad_token_id {pad!r} is outside the vocabulary (size {d['vocab_size']})",
                              "fix it with --set pad_token_id=N, or let 'mlmtool tokenizer' set it")
        local = d.get("local_attention", 128)
        if d.get("sliding_window") is not None:  # transformers' setter: local_attention = 2 x sliding_window
            require_positive_ints(d, ("sliding_window",))
            local = 2 * d["sliding_window"]
        theta = _resolve_rope_theta(d)
        kwargs = config_fields(ModernBertConfig, d, layer_types=_resolve_layer_types(d), local_attention=local,
                               global_rope_theta=theta[FULL], local_rope_theta=theta[SLIDING])
        return ModernBertConfig(**kwargs)

    def weight_table(self, config: ModernBertConfig) -> WeightTable:
        """Every parameter: our path, the HF key, our shape, whether to transpose.

        What transformers v5 writes with ``save_pretrained`` (``[.bias]``: with the config's
        ``*_bias`` flag)::

            model.embeddings.tok_embeddings.weight, model.embeddings.norm.weight[, .bias]
            model.layers.<i>.attn_norm.weight[, .bias]        (not layer 0: its attn_norm is the identity)
            model.layers.<i>.attn.Wqkv.weight[, .bias]        [3 x hidden, hidden]: q, k, v stacked
            model.layers.<i>.attn.Wo.*, .mlp_norm.*, .mlp.Wi.* ([2 x intermediate, hidden]: input, gate), .mlp.Wo.*
            model.final_norm.*, head.dense.*, head.norm.*, decoder.bias

        ``decoder.weight`` is tied to the token embeddings: not written; on input a copy
        equal to them is accepted.
        """
        H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
        nb, ab, mb = config.norm_bias, config.attention_bias, config.mlp_bias
        e: list[WeightEntry] = [WeightEntry(("model", "embeddings", "tok_embeddings", "embedding"),
                                            "model.embeddings.tok_embeddings.weight", (V, H), ("vocab", "embed"))]
        e += norm_entries(("model", "embeddings", "norm"), "model.embeddings.norm", H, bias=nb)
        for i in range(config.num_hidden_layers):
            ours, hf = ("model", "layers", str(i)), f"model.layers.{i}"
            if i:
                e += norm_entries((*ours, "attn_norm"), f"{hf}.attn_norm", H, bias=nb)
            e += dense_entries((*ours, "attn", "Wqkv"), f"{hf}.attn.Wqkv", H, 3 * H, ("embed", "heads"), bias=ab)
            e += dense_entries((*ours, "attn", "Wo"), f"{hf}.attn.Wo", H, H, ("heads", "embed"), bias=ab)
            e += norm_entries((*ours, "mlp_norm"), f"{hf}.mlp_norm", H, bias=nb)
            e += dense_entries((*ours, "mlp", "Wi"), f"{hf}.mlp.Wi", H, 2 * I, ("embed", "mlp"), bias=mb)
            e += dense_entries((*ours, "mlp", "Wo"), f"{hf}.mlp.Wo", I, H, ("mlp", "embed"), bias=mb)
        e += norm_entries(("model", "final_norm"), "model.final_norm", H, bias=nb)
        e += dense_entries(("head", "dense"), "head.dense", H, H, ("embed", "embed"),
                           bias=config.classifier_bias)
        e += norm_entries(("head", "norm"), "head.norm", H, bias=nb)
        if config.decoder_bias:
            e.append(WeightEntry(("decoder", "bias"), "decoder.bias", (V,), ("vocab",)))
        return WeightTable(entries=tuple(e), tied=(("decoder.weight", "model.embeddings.tok_embeddings.weight"),))

    def parameter_count(self, hf: dict) -> int:
        H, I, V, L = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
        nb, ab, mb = (int(bool(hf.get(k, False))) for k in ("norm_bias", "attention_bias", "mlp_bias"))
        norm = H + nb * H
        layer = (3 * H * H + ab * 3 * H) + (H * H + ab * H) + norm + (H * 2 * I + mb * 2 * I) + (I * H + mb * H)
        head = H * H + int(bool(hf.get("classifier_bias", False))) * H + norm
        decoder = V if hf.get("decoder_bias", True) else 0
        return V * H + norm + L * layer + (L - 1) * norm + norm + head + decoder

    def summary(self, hf: dict) -> dict:
        return {"model_type": hf["model_type"], "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"],
                "heads": hf["num_attention_heads"], "intermediate": hf["intermediate_size"],
                "vocab": hf["vocab_size"], "max_positions": hf["max_position_embeddings"]}

    def recipe_hint(self, model_type: str) -> str | None:
        # Warner et al. 2024, section 2.2: 30% masking, sequences of 1024 before the context
        # extension, a trapezoidal (warm-up, stable, 1-sqrt decay) schedule, no dropout
        # (config.json's defaults), AdamW-style betas (0.9, 0.98) (train's defaults).
        return "ModernBERT recipe: prepare --max-seq-length 1024; train --mlm-probability 0.3 --lr-scheduler wsd"

    def tiny_test_configs(self) -> dict[str, dict]:
        small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, local_attention=8,
                     layer_types=layer_types_every(3), **_SMALL_IDS)
        return {
            "modernbert": {**_BASE, **small},
            # every bias on (the flags' non-default side), each kind's theta in v5's rope_parameters
            "modernbert-biases": {**_BASE, **small, **dict.fromkeys(BOOL_FIELDS, True),
                                  "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": 5000.0},
                                                      SLIDING: {"rope_type": "default", "rope_theta": 100.0}}},
            # a pre-v5 hub config: the pattern and thetas under their old names, other activations, no decoder bias
            "modernbert-legacy": {**{k: v for k, v in {**_BASE, **small}.items()
                                     if k not in ("layer_types", "rope_parameters")},
                                  "global_attn_every_n_layers": 2, "global_rope_theta": 5000.0,
                                  "local_rope_theta": 100.0, "hidden_activation": "gelu_new",
                                  "classifier_activation": "silu", "decoder_bias": False},
        }


FAMILY = ModernBertFamily()
