"""The BERT family: BERT, RoBERTa, XLM-RoBERTa and CamemBERT (one network, four model_types).

* BERT: Devlin et al. 2018, arXiv:1810.04805.
* RoBERTa: Liu et al. 2019, arXiv:1907.11692.  Same network; the differences that matter
  here are the position ids (counted from ``pad_token_id + 1``, padding keeps position
  ``pad_token_id``), a single token type and, in Hugging Face's head, a hard-coded exact GELU.
* XLM-RoBERTa: Conneau et al. 2019, arXiv:1911.02116, and CamemBERT: Martin et al. 2019,
  arXiv:1911.03894: RoBERTa's network with a SentencePiece (Unigram) vocabulary, under their
  own ``model_type`` and architecture; their HF state dicts use RoBERTa's key names.

This module holds the jax-free facts (config, presets, weight table, parameter count,
tokenizer conventions); the network is ``mlmtool.models.bert_flax``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from mlmtool.errors import ConfigError
from mlmtool.models.base import (
    BERT_SPECIALS,
    ROBERTA_SPECIALS,
    Family,
    FamilyConfig,
    TokenizerDefaults,
    WeightEntry,
    WeightTable,
    config_fields,
    dense_entries,
    is_int,
    norm_entries,
    refuse,
    require_model_type,
    require_numbers,
    require_positive_ints,
)

ACTIVATION_NAMES = ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


class Variant(NamedTuple):
    architecture: str   # HF *ForMaskedLM class
    prefix: str         # state-dict prefix of the encoder
    roberta: bool       # RoBERTa position ids and head GELU


VARIANTS = {
    "roberta": Variant("RobertaForMaskedLM", "roberta", True),
    "bert": Variant("BertForMaskedLM", "bert", False),
    "xlm-roberta": Variant("XLMRobertaForMaskedLM", "roberta", True),
    "camembert": Variant("CamembertForMaskedLM", "roberta", True),
}


@dataclasses.dataclass(frozen=True)
class BertConfig(FamilyConfig):
    """The architecture, with Hugging Face ``config.json`` field names.

    Defaults are RoBERTa-base's (Liu et al. 2019) except the sizes, which have none on purpose.
    """

    model_type: str  # a VARIANTS key
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
        if self.model_type not in VARIANTS:
            raise ConfigError(f"unsupported model_type {self.model_type!r}",
                              hint=f"use one of {', '.join(VARIANTS)}")
        check_fields(dataclasses.asdict(self), roberta=self.variant.roberta)

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.model_type]

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table allows (RoBERTa loses pad_token_id + 1 slots)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.variant.roberta else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        return FAMILY.parse_config(d)


def check_fields(d: dict, *, roberta: bool) -> None:
    """Ranges and types of the fields the network reads (messages name the --set fix)."""
    require_positive_ints(d, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                              "intermediate_size", "max_position_embeddings"))
    require_positive_ints(d, ("type_vocab_size",), default=1)
    require_numbers(d, ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range"),
                    positive=("layer_norm_eps", "initializer_range"),
                    probability=("hidden_dropout_prob", "attention_probs_dropout_prob"))
    act = d.get("hidden_act", "gelu")
    if not isinstance(act, str):
        raise ConfigError(f"config hidden_act must be a string, got {act!r}", "fix it with --set hidden_act=gelu")
    if act not in ACTIVATION_NAMES:
        raise ConfigError(f"unsupported hidden_act {act!r}", hint=f"use one of {', '.join(ACTIVATION_NAMES)}")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ConfigError(f"hidden_size {d['hidden_size']} is not a multiple of num_attention_heads "
                          f"{d['num_attention_heads']}", "change one of them with --set")
    pad = d.get("pad_token_id", 1)
    if not is_int(pad) or not 0 <= pad < d["vocab_size"]:
        raise ConfigError(f"pad_token_id {pad!r} is outside the vocabulary (size {d['vocab_size']})")
    if roberta and d["max_position_embeddings"] <= pad + 1:
        raise ConfigError(
            f"max_position_embeddings {d['max_position_embeddings']} leaves no positions: "
            f"RoBERTa positions start at pad_token_id + 1 = {pad + 1}",
            "fix it with --set max_position_embeddings=N")


_ROBERTA = dict(
    model_type="roberta", architectures=["RobertaForMaskedLM"], vocab_size=50265, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=514,  # 512 tokens + padding_idx offset of 2 (RoBERTa positions start at pad+1)
    type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2,
)
_BERT = dict(
    model_type="bert", architectures=["BertForMaskedLM"], vocab_size=30522, hidden_size=768, num_hidden_layers=12,
    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
    layer_norm_eps=1e-12, pad_token_id=0,
)
# FacebookAI/xlm-roberta-base: RoBERTa-base with a 250,002-token SentencePiece vocabulary.
_XLMR = {**_ROBERTA, "model_type": "xlm-roberta", "architectures": ["XLMRobertaForMaskedLM"], "vocab_size": 250002}
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
# hidden 256 x 4 layers x 4 heads, intermediate 1024, vocab 8192: the benchmarks' reference model.
_SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
# Small enough that `make demo` trains it in minutes on 2 CPU cores.
_TINY = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)

_COMMON_DEFAULTS = dict(
    add_cross_attention=False, architectures=None, attention_probs_dropout_prob=0.1, chunk_size_feed_forward=0,
    classifier_dropout=None, dtype=None, hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=768,
    id2label={"0": "LABEL_0", "1": "LABEL_1"}, initializer_range=0.02, intermediate_size=3072, is_decoder=False,
    is_encoder_decoder=False, label2id={"LABEL_0": 0, "LABEL_1": 1}, layer_norm_eps=1e-12,
    max_position_embeddings=512, num_attention_heads=12, num_hidden_layers=12, output_attentions=False,
    output_hidden_states=False, problem_type=None, return_dict=True, tie_word_embeddings=True, type_vocab_size=2,
    use_cache=True,
)
_ROBERTA_IDS = dict(vocab_size=30522, bos_token_id=0, pad_token_id=1, eos_token_id=2)
_ROBERTA_TOKENIZER = TokenizerDefaults("bpe", config_ids=(("pad_token_id", "pad"), ("bos_token_id", "cls"),
                                                          ("eos_token_id", "sep")),
                                       hf_class="RobertaTokenizer",
                                       hf_fields=(("add_prefix_space", False), ("trim_offsets", True),
                                                  ("errors", "replace")))
# XLM-R's and CamemBERT's classes rebuild SentencePiece's pipeline: a Precompiled normalizer
# (mlmtool's is NFKC as SentencePiece's nmt_nfkc rule), whitespace split, Metaspace.
_UNIGRAM_TOKENIZER = dataclasses.replace(_ROBERTA_TOKENIZER, algorithm="unigram", specials=ROBERTA_SPECIALS,
                                         hf_class="XLMRobertaTokenizer", hf_fields=(("add_prefix_space", True),))
#: BERT's WordPiece, as BertTokenizer (bert-base-uncased) writes it: token types for pairs.
BERT_TOKENIZER = TokenizerDefaults("wordpiece", lowercase=True, specials=BERT_SPECIALS, hf_class="BertTokenizer",
                                   hf_fields=(("strip_accents", None), ("tokenize_chinese_chars", True)),
                                   hf_lowercase=True,
                                   model_input_names=("input_ids", "token_type_ids", "attention_mask"),
                                   clean_up_tokenization_spaces=True)


def bert_layer_entries(ours: tuple[str, ...], hf: str, H: int, I: int) -> list[WeightEntry]:
    """One BERT block (``bert_flax.EncoderLayer``) at our path ``ours`` and HF key prefix ``hf``::

        hf.attention.self.{query,key,value}.*, hf.attention.output.{dense,LayerNorm}.*,
        hf.intermediate.dense.*, hf.output.{dense,LayerNorm}.*
    """
    e: list[WeightEntry] = []
    for proj in ("query", "key", "value"):
        e += dense_entries((*ours, "attention", "self", proj), f"{hf}.attention.self.{proj}", H, H, ("embed", "heads"))
    e += dense_entries((*ours, "attention", "output", "dense"), f"{hf}.attention.output.dense", H, H,
                       ("heads", "embed"))
    e += norm_entries((*ours, "attention", "output", "LayerNorm"), f"{hf}.attention.output.LayerNorm", H)
    e += dense_entries((*ours, "intermediate", "dense"), f"{hf}.intermediate.dense", H, I, ("embed", "mlp"))
    e += dense_entries((*ours, "output", "dense"), f"{hf}.output.dense", I, H, ("mlp", "embed"))
    e += norm_entries((*ours, "output", "LayerNorm"), f"{hf}.output.LayerNorm", H)
    return e


class BertFamily(Family):
    name = "bert"
    model_types = {t: v.architecture for t, v in VARIANTS.items()}
    presets = {
        "roberta-base": _ROBERTA,
        "roberta-large": {**_ROBERTA, **_LARGE},
        "roberta-small": {**_ROBERTA, **_SMALL},
        "roberta-tiny": {**_ROBERTA, **_TINY},
        "bert-base": _BERT,
        "bert-large": {**_BERT, **_LARGE},
        "bert-small": {**_BERT, **_SMALL},
        "bert-tiny": {**_BERT, **_TINY},
        "xlm-roberta-base": _XLMR,
        "xlm-roberta-large": {**_XLMR, **_LARGE},
        "xlm-roberta-tiny": {**_XLMR, **_TINY},
    }
    preset_help = {
        "roberta-base": "RoBERTa base, 125M params (HF roberta-base)",
        "roberta-large": "RoBERTa large, 355M params (HF roberta-large)",
        "roberta-small": "RoBERTa, 4 x 256, for CPU work (the benchmarks' reference)",
        "roberta-tiny": "RoBERTa, 2 x 128, for demos and tests",
        "bert-base": "BERT base uncased, 110M params (HF bert-base-uncased)",
        "bert-large": "BERT large uncased, 335M params (HF bert-large-uncased)",
        "bert-small": "BERT, 4 x 256",
        "bert-tiny": "BERT, 2 x 128",
        "xlm-roberta-base": "XLM-RoBERTa base, 278M params, 250k Unigram vocab (HF xlm-roberta-base)",
        "xlm-roberta-large": "XLM-RoBERTa large, 560M params (HF xlm-roberta-large)",
        "xlm-roberta-tiny": "XLM-RoBERTa, 2 x 128, vocab 8192, for tests",
    }
    preset_aliases = {"small": "roberta-small", "tiny": "roberta-tiny"}
    hf_defaults = {
        "roberta": {**_COMMON_DEFAULTS, "model_type": "roberta", "vocab_size": 50265, "bos_token_id": 0,
                    "pad_token_id": 1, "eos_token_id": 2},
        "bert": {**_COMMON_DEFAULTS, "model_type": "bert", "vocab_size": 30522, "bos_token_id": None,
                 "pad_token_id": 0, "eos_token_id": None},
        "xlm-roberta": {**_COMMON_DEFAULTS, **_ROBERTA_IDS, "model_type": "xlm-roberta"},
        "camembert": {**_COMMON_DEFAULTS, **_ROBERTA_IDS, "model_type": "camembert"},
    }
    tokenizer = {
        "roberta": _ROBERTA_TOKENIZER,
        "bert": BERT_TOKENIZER,
        "xlm-roberta": _UNIGRAM_TOKENIZER,
        # CamembertTokenizer adds <s>NOTUSED, </s>NOTUSED, <unk>NOTUSED (camembert-base's ids 0, 2, 4)
        # to a vocabulary without them unless told there are no extra specials
        "camembert": dataclasses.replace(_UNIGRAM_TOKENIZER, hf_class="CamembertTokenizer",
                                         hf_fields=(("add_prefix_space", True), ("extra_special_tokens", []))),
    }
    network = "mlmtool.models.bert_flax:MaskedLM"
    head_modules = ("lm_head",)
    architecture_keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings", "type_vocab_size", "hidden_act",
                         "layer_norm_eps", "pad_token_id")
    document_attention = True  # segment_ids: positions restart per document, attention stays inside
    document_attention_default = False  # the published recipe packs across documents
    shape_fields = (("vocab_size", ("embeddings", "word_embeddings", "embedding"), 0),
                    ("hidden_size", ("embeddings", "word_embeddings", "embedding"), 1),
                    ("max_position_embeddings", ("embeddings", "position_embeddings", "embedding"), 0),
                    ("type_vocab_size", ("embeddings", "token_type_embeddings", "embedding"), 0),
                    ("intermediate_size", ("encoder", "layer", "0", "intermediate", "dense", "kernel"), 1))
    layers_path = ("encoder", "layer")

    def parse_config(self, d: dict) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dict; unknown keys are ignored."""
        require_model_type(d, VARIANTS)
        # Features of the HF classes this network does not implement: refuse rather than
        # silently computing something else.
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        refuse(d, "position_embedding_type", ("absolute",), "only absolute position embeddings are implemented")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        return BertConfig(**config_fields(BertConfig, d))

    def weight_table(self, config: BertConfig) -> WeightTable:
        """Every parameter: our path, the HF key, our shape, whether to transpose.

        What transformers v5 writes with ``save_pretrained`` (``P`` = ``roberta`` or ``bert``)::

            P.embeddings.{word,position,token_type}_embeddings.weight, P.embeddings.LayerNorm.*
            P.encoder.layer.<i>.attention.self.{query,key,value}.*, .attention.output.dense.*,
              .attention.output.LayerNorm.*, .intermediate.dense.*, .output.dense.*, .output.LayerNorm.*
            RoBERTa head: lm_head.dense.*, lm_head.layer_norm.*, lm_head.bias
            BERT head:    cls.predictions.transform.dense.*, cls.predictions.transform.LayerNorm.*,
                          cls.predictions.bias

        The tied decoder (``lm_head.decoder.*`` / ``cls.predictions.decoder.*``) is not
        written: it is the word-embedding table and the head bias.  On input older
        checkpoints' extras are accepted: the decoder copies (equal to their source),
        ``position_ids``/``token_type_ids`` buffers, a pooler or BERT's next-sentence head
        (ignored), and TF-era ``LayerNorm.gamma``/``beta`` names.  An imported pooler
        (``P.pooler.dense.*``, from a ``*Model`` or ``BertForPreTraining`` directory) is
        carried unchanged into the exports; a model trained from scratch has none.
        """
        H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
        variant = config.variant
        p = variant.prefix
        e: list[WeightEntry] = []
        for name, rows, axis in (("word_embeddings", V, "vocab"),
                                 ("position_embeddings", config.max_position_embeddings, "positions"),
                                 ("token_type_embeddings", config.type_vocab_size, "types")):
            e.append(WeightEntry(("embeddings", name, "embedding"), f"{p}.embeddings.{name}.weight", (rows, H),
                                 (axis, "embed")))
        e += norm_entries(("embeddings", "LayerNorm"), f"{p}.embeddings.LayerNorm", H)
        for i in range(config.num_hidden_layers):
            e += bert_layer_entries(("encoder", "layer", str(i)), f"{p}.encoder.layer.{i}", H, I)
        head = ("lm_head.dense", "lm_head.layer_norm", "lm_head") if variant.roberta else \
            ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions")
        e += dense_entries(("lm_head", "dense"), head[0], H, H, ("embed", "embed"))
        e += norm_entries(("lm_head", "layer_norm"), head[1], H)
        e.append(WeightEntry(("lm_head", "bias"), f"{head[2]}.bias", (V,), ("vocab",)))
        return WeightTable(
            entries=tuple(e),
            tied=((f"{head[2]}.decoder.weight", f"{p}.embeddings.word_embeddings.weight"),
                  (f"{head[2]}.decoder.bias", f"{head[2]}.bias")),
            ignored=(rf"^{p}\.embeddings\.(position_ids|token_type_ids)$"  # non-persistent buffers
                     rf"|^{p}\.pooler\."  # from *Model / *ForPreTraining checkpoints
                     r"|^cls\.seq_relationship\."),  # BERT's next-sentence-prediction head
            renames=((r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight"), (r"(LayerNorm|layer_norm)\.beta$", r"\1.bias")),
            carried=rf"^{p}\.pooler\.dense\.(weight|bias)$",
        )

    def parameter_count(self, hf: dict) -> int:
        H, I, V = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
        P, T, L = hf["max_position_embeddings"], hf.get("type_vocab_size", 2), hf["num_hidden_layers"]
        embeddings = (V + P + T) * H + 2 * H
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        head = (H * H + H) + 2 * H + V
        return embeddings + L * layer + head

    def summary(self, hf: dict) -> dict:
        return {"model_type": hf["model_type"], "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"],
                "heads": hf["num_attention_heads"], "intermediate": hf["intermediate_size"],
                "vocab": hf["vocab_size"], "max_positions": hf["max_position_embeddings"],
                "type_vocab_size": hf.get("type_vocab_size")}

    def tiny_test_configs(self) -> dict[str, dict]:
        small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return {
            "roberta": {**_ROBERTA, **small, "max_position_embeddings": 40},
            "bert": {**_BERT, **small, "max_position_embeddings": 40, "hidden_act": "gelu_new"},
            "xlm-roberta": {**_XLMR, **small, "max_position_embeddings": 40},
            "camembert": {**_ROBERTA, **small, "model_type": "camembert", "architectures": ["CamembertForMaskedLM"],
                          "max_position_embeddings": 40, "pad_token_id": 1},
        }


FAMILY = BertFamily()
