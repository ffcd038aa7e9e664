"""The ALBERT family (Lan et al. 2019, "ALBERT: A Lite BERT for Self-supervised Learning of
Language Representations", arXiv:1909.11942): BERT's post-LN blocks with

* factorized embeddings: word, position and token-type tables of width ``embedding_size``
  (E, 128 in every published size), mapped to ``hidden_size`` by
  ``encoder.embedding_hidden_mapping_in``; the MLM head maps back to E and decodes with the
  tied E-wide word embeddings;
* cross-layer parameter sharing: ``num_hidden_groups`` groups of ``inner_group_num`` layers;
  the ``num_hidden_layers`` steps each run one whole group (step i runs group
  ``int(i / (num_hidden_layers / num_hidden_groups))``, as transformers does).

mlmtool pre-trains it with the MLM loss alone: the paper's sentence-order prediction head
(``AlbertForPreTraining``'s ``sop_classifier``) is not implemented, as DistilBERT's
distillation is not; the result is an ``AlbertForMaskedLM`` directory.  The tokenizer is
SentencePiece-style Unigram with ALBERT's specials (``<pad> <unk> [CLS] [SEP] [MASK]``,
lowercased, as albert-base-v2's spiece.model).  The network is ``mlmtool.models.albert_flax``.
"""

from __future__ import annotations

import collections
import dataclasses
import math

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
    norm_entries,
    refuse,
    require_model_type,
    require_numbers,
    require_positive_ints,
)
from mlmtool.models.bert import ACTIVATION_NAMES


@dataclasses.dataclass(frozen=True)
class AlbertConfig(FamilyConfig):
    """ALBERT's ``config.json`` fields (defaults: transformers' AlbertConfig, albert-xxlarge's)."""

    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "albert"

    def __post_init__(self) -> None:
        _check(dataclasses.asdict(self))

    @property
    def num_layers(self) -> int:
        """Layers applied (each of the num_hidden_layers steps runs inner_group_num of them)."""
        return self.num_hidden_layers * self.inner_group_num

    @property
    def decoder_width(self) -> int:
        return self.embedding_size

    def group_of(self, step: int) -> int:
        """The layer group step ``step`` runs (transformers' formula)."""
        return int(step / (self.num_hidden_layers / self.num_hidden_groups))


def _check(d: dict) -> None:
    require_positive_ints(d, ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                              "num_attention_heads", "intermediate_size", "num_hidden_groups", "inner_group_num",
                              "max_position_embeddings", "type_vocab_size"))
    require_numbers(d, ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range"),
                    positive=("layer_norm_eps", "initializer_range"),
                    probability=("hidden_dropout_prob", "attention_probs_dropout_prob"))
    if d["hidden_act"] not in ACTIVATION_NAMES:
        raise ConfigError(f"unsupported hidden_act {d['hidden_act']!r}",
                          hint=f"use one of {', '.join(ACTIVATION_NAMES)}")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ConfigError(f"hidden_size {d['hidden_size']} is not a multiple of num_attention_heads "
                          f"{d['num_attention_heads']}", "change one of them with --set")
    if d["num_hidden_groups"] > d["num_hidden_layers"]:
        raise ConfigError(f"num_hidden_groups {d['num_hidden_groups']} is more than num_hidden_layers "
                          f"{d['num_hidden_layers']}: some groups would never run",
                          "fix it with --set num_hidden_groups=1")
    pad = d["pad_token_id"]
    if not is_int(pad) or not 0 <= pad < d["vocab_size"]:
        raise ConfigError(f"pad_token_id {pad!r} is outside the vocabulary (size {d['vocab_size']})")


#: albert-base-v2's spiece.model: <pad> <unk> [CLS] [SEP] [MASK] are ids 0-4; [CLS] A [SEP] B [SEP]
ALBERT_SPECIALS = SpecialTokens(pad="<pad>", unk="<unk>", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                                order=("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"), bos="[CLS]", eos="[SEP]")

# albert-base-v2 (the v2 models: no dropout, the tanh GELU, 30k SentencePiece vocabulary)
_BASE = dict(
    model_type="albert", architectures=["AlbertForMaskedLM"], vocab_size=30000, embedding_size=128, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_hidden_groups=1, inner_group_num=1,
    hidden_act="gelu_new", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=2, eos_token_id=3,
)
_HF_DEFAULTS = {
    "architectures": None, "attention_probs_dropout_prob": 0.0, "bos_token_id": 2, "chunk_size_feed_forward": 0,
    "classifier_dropout_prob": 0.1, "dtype": None, "embedding_size": 128, "eos_token_id": 3, "hidden_act": "gelu_new",
    "hidden_dropout_prob": 0.0, "hidden_size": 4096, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02, "inner_group_num": 1, "intermediate_size": 16384, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "albert", "num_attention_heads": 64, "num_hidden_groups": 1, "num_hidden_layers": 12,
    "output_attentions": False, "output_hidden_states": False, "pad_token_id": 0, "problem_type": None,
    "return_dict": True, "tie_word_embeddings": True, "type_vocab_size": 2, "vocab_size": 30000,
}


class AlbertFamily(Family):
    name = "albert"
    model_types = {"albert": "AlbertForMaskedLM"}
    presets = {
        "albert-base-v2": _BASE,
        "albert-large-v2": {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                            "intermediate_size": 4096},
        "albert-xlarge-v2": {**_BASE, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
                             "intermediate_size": 8192},
        "albert-xxlarge-v2": {**_BASE, "hidden_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 64,
                              "intermediate_size": 16384},
        "albert-tiny": {**_BASE, "vocab_size": 8192, "embedding_size": 64, "hidden_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 512},
    }
    preset_help = {
        "albert-base-v2": "ALBERT base v2, 12M params, one shared layer (HF albert-base-v2)",
        "albert-large-v2": "ALBERT large v2, 18M params (HF albert-large-v2)",
        "albert-xlarge-v2": "ALBERT xlarge v2, 59M params (HF albert-xlarge-v2)",
        "albert-xxlarge-v2": "ALBERT xxlarge v2, 223M params (HF albert-xxlarge-v2)",
        "albert-tiny": "ALBERT, 2 x 128, embeddings 64, for tests",
    }
    hf_defaults = {"albert": _HF_DEFAULTS}
    tokenizer = {"albert": TokenizerDefaults("unigram", lowercase=True, specials=ALBERT_SPECIALS,
                                             config_ids=(("pad_token_id", "pad"), ("bos_token_id", "cls"),
                                                         ("eos_token_id", "sep")))}
    network = "mlmtool.models.albert_flax:MaskedLM"
    head_modules = ("predictions",)
    architecture_keys = ("model_type", "vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "num_hidden_groups", "inner_group_num",
                         "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "pad_token_id")
    document_attention = True  # segment_ids: positions restart per document, attention stays inside
    shape_fields = (("vocab_size", ("embeddings", "word_embeddings", "embedding"), 0),
                    ("embedding_size", ("embeddings", "word_embeddings", "embedding"), 1),
                    ("hidden_size", ("encoder", "embedding_hidden_mapping_in", "kernel"), 1),
                    ("max_position_embeddings", ("embeddings", "position_embeddings", "embedding"), 0),
                    ("type_vocab_size", ("embeddings", "token_type_embeddings", "embedding"), 0),
                    ("intermediate_size",
                     ("encoder", "albert_layer_groups", "0", "albert_layers", "0", "ffn", "kernel"), 1))

    def parse_config(self, d: dict) -> AlbertConfig:
        require_model_type(d, self.model_types)
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        refuse(d, "position_embedding_type", ("absolute",), "only absolute position embeddings are implemented")
        return AlbertConfig(**config_fields(AlbertConfig, d))

    def weight_table(self, config: AlbertConfig) -> WeightTable:
        """transformers v5 ``AlbertForMaskedLM`` keys::

            albert.embeddings.{word,position,token_type}_embeddings.weight   [., E]
            albert.embeddings.LayerNorm.*                                     [E]
            albert.encoder.embedding_hidden_mapping_in.*                      [H, E]
            albert.encoder.albert_layer_groups.<g>.albert_layers.<j>.attention.{query,key,value,dense,LayerNorm}.*
              ....ffn.*, .ffn_output.*, .full_layer_layer_norm.*
            predictions.{dense [E, H], LayerNorm [E], bias [V]}

        ``predictions.decoder.{weight,bias}`` are tied to the word embeddings and the head
        bias (not written; accepted on input when equal); buffers, a pooler and the
        sentence-order head of ``AlbertForPreTraining`` checkpoints are ignored.
        """
        E, H, I, V = config.embedding_size, config.hidden_size, config.intermediate_size, config.vocab_size
        e: list[WeightEntry] = []
        for name, rows, axis in (("word_embeddings", V, "vocab"),
                                 ("position_embeddings", config.max_position_embeddings, "positions"),
                                 ("token_type_embeddings", config.type_vocab_size, "types")):
            e.append(WeightEntry(("embeddings", name, "embedding"), f"albert.embeddings.{name}.weight", (rows, E),
                                 (axis, "embedding")))
        e += norm_entries(("embeddings", "LayerNorm"), "albert.embeddings.LayerNorm", E)
        e += dense_entries(("encoder", "embedding_hidden_mapping_in"), "albert.encoder.embedding_hidden_mapping_in",
                           E, H, ("embedding", "embed"))
        for g in range(config.num_hidden_groups):
            for j in range(config.inner_group_num):
                ours = ("encoder", "albert_layer_groups", str(g), "albert_layers", str(j))
                hf = f"albert.encoder.albert_layer_groups.{g}.albert_layers.{j}"
                for proj in ("query", "key", "value", "dense"):
                    e += dense_entries((*ours, "attention", proj), f"{hf}.attention.{proj}", H, H,
                                       ("heads", "embed") if proj == "dense" else ("embed", "heads"))
                e += norm_entries((*ours, "attention", "LayerNorm"), f"{hf}.attention.LayerNorm", H)
                e += dense_entries((*ours, "ffn"), f"{hf}.ffn", H, I, ("embed", "mlp"))
                e += dense_entries((*ours, "ffn_output"), f"{hf}.ffn_output", I, H, ("mlp", "embed"))
                e += norm_entries((*ours, "full_layer_layer_norm"), f"{hf}.full_layer_layer_norm", H)
        e += dense_entries(("predictions", "dense"), "predictions.dense", H, E, ("embed", "embedding"))
        e += norm_entries(("predictions", "LayerNorm"), "predictions.LayerNorm", E)
        e.append(WeightEntry(("predictions", "bias"), "predictions.bias", (V,), ("vocab",)))
        return WeightTable(
            entries=tuple(e),
            tied=(("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight"),
                  ("predictions.decoder.bias", "predictions.bias")),
            ignored=r"^albert\.embeddings\.(position_ids|token_type_ids)$|^albert\.pooler\.|^sop_classifier\.")

    def parameter_count(self, hf: dict) -> int:
        E, H, I, V = hf["embedding_size"], hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
        P, T = hf["max_position_embeddings"], hf.get("type_vocab_size", 2)
        layers = hf.get("num_hidden_groups", 1) * hf.get("inner_group_num", 1)
        embeddings = (V + P + T) * E + 2 * E + (E * H + H)
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        head = (H * E + E) + 2 * E + V
        return embeddings + layers * layer + head

    def matmul_parameters(self, config: AlbertConfig) -> tuple[int, int]:
        """As ``Family``'s, with each shared layer counted once per time it runs."""
        encoder = head = 0
        runs = collections.Counter(config.group_of(i) for i in range(config.num_hidden_layers))  # steps per group
        for e in self.weight_table(config).entries:
            n = math.prod(e.shape)
            if e.path[0] in self.head_modules:
                head += n
            elif e.path[-1] != "embedding":
                encoder += n * (runs[int(e.path[2])] if e.path[1] == "albert_layer_groups" else 1)
        return encoder, head + config.vocab_size * config.decoder_width

    def summary(self, hf: dict) -> dict:
        return {"model_type": hf["model_type"], "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"],
                "heads": hf["num_attention_heads"], "intermediate": hf["intermediate_size"],
                "embedding": hf["embedding_size"], "layer_groups": hf.get("num_hidden_groups", 1),
                "vocab": hf["vocab_size"], "max_positions": hf["max_position_embeddings"]}

    def tiny_test_configs(self) -> dict[str, dict]:
        small = dict(vocab_size=96, embedding_size=16, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=40)
        return {
            "albert": {**_BASE, **small, "num_hidden_layers": 2},
            # 4 steps over 2 groups of 2 layers: the sharing and the group formula exercised
            "albert-groups": {**_BASE, **small, "num_hidden_layers": 4, "num_hidden_groups": 2, "inner_group_num": 2},
        }


FAMILY = AlbertFamily()
