"""The RoFormer family (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
Embedding", arXiv:2104.09864): BERT's post-LN blocks with no position embeddings; instead the
queries and keys of every layer are rotated by the sinusoidal table ``encoder.embed_positions``
(``rotary_value``: the values too), and word/token-type embeddings of width ``embedding_size``
(mapped to ``hidden_size`` by ``embeddings_project`` where they differ; the head maps back).

The sinusoidal table is a parameter of transformers' ``RoFormerForMaskedLM`` (frozen there); it
is one here too, in the export and the checkpoints, never trained: the network stops its
gradient and it has no weight decay, so the optimizer leaves it as initialised (or loaded).
The tokenizer is WordPiece with BERT's specials; RoFormer's Chinese word-level
pre-tokenizer (jieba, ``RoFormerTokenizer``) is not implemented: the WordPiece splits Chinese
characters one by one, as BERT's does.  The network is ``mlmtool.models.roformer_flax``.
"""

from __future__ import annotations

import dataclasses

from mlmtool.errors import ConfigError
from mlmtool.models.base import (
    BERT_SPECIALS,
    Family,
    FamilyConfig,
    TokenizerDefaults,
    WeightEntry,
    WeightTable,
    config_fields,
    dense_entries,
    norm_entries,
    refuse,
    require_model_type,
    require_positive_ints,
)
from mlmtool.models.bert import bert_layer_entries, check_fields


@dataclasses.dataclass(frozen=True)
class RoFormerConfig(FamilyConfig):
    """RoFormer's ``config.json`` fields (defaults: transformers' RoFormerConfig)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    embedding_size: int | None = None  # None: hidden_size
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 1536
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    rotary_value: bool = False

    def __post_init__(self) -> None:
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.hidden_size)
        d = dataclasses.asdict(self)
        check_fields(d, roberta=False)
        require_positive_ints(d, ("embedding_size",))
        if not isinstance(self.rotary_value, bool):
            raise ConfigError(f"config rotary_value must be true or false, got {self.rotary_value!r}")
        if self.head_dim % 2:
            raise ConfigError(f"the head size hidden_size / num_attention_heads = {self.head_dim} is odd: "
                              "rotary embeddings rotate pairs of dimensions", "change one of them with --set")

    @property
    def decoder_width(self) -> int:
        return self.embedding_size or self.hidden_size  # set in __post_init__

    @property
    def projected(self) -> bool:
        """The embeddings are narrower (or wider) than the encoder: ``embeddings_project`` maps them."""
        return self.embedding_size != self.hidden_size


# junnyu/roformer_chinese_base (Su et al.'s RoFormer-Chinese base, converted to transformers)
_BASE = dict(
    model_type="roformer", architectures=["RoFormerForMaskedLM"], vocab_size=50000, embedding_size=768,
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=1536, type_vocab_size=2,
    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, rotary_value=False,
)
_HF_DEFAULTS = {
    "add_cross_attention": False, "architectures": None, "attention_probs_dropout_prob": 0.1, "bos_token_id": None,
    "chunk_size_feed_forward": 0, "dtype": None, "embedding_size": 768, "eos_token_id": None, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02, "intermediate_size": 3072, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-12, "max_position_embeddings": 1536,
    "model_type": "roformer", "num_attention_heads": 12, "num_hidden_layers": 12, "output_attentions": False,
    "output_hidden_states": False, "pad_token_id": 0, "problem_type": None, "return_dict": True,
    "rotary_value": False, "tie_word_embeddings": True, "type_vocab_size": 2, "use_cache": True, "vocab_size": 50000,
}
_EMBED_POSITIONS = ("encoder", "embed_positions", "embedding")


class RoFormerFamily(Family):
    name = "roformer"
    model_types = {"roformer": "RoFormerForMaskedLM"}
    presets = {
        "roformer-base": _BASE,
        "roformer-small": {**_BASE, "embedding_size": 384, "hidden_size": 384, "num_hidden_layers": 6,
                           "num_attention_heads": 6, "intermediate_size": 1536},
        "roformer-tiny": {**_BASE, "vocab_size": 8192, "embedding_size": 64, "hidden_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512,
                          "max_position_embeddings": 512},
    }
    preset_help = {
        "roformer-base": "RoFormer base, 124M params (HF junnyu/roformer_chinese_base)",
        "roformer-small": "RoFormer small, 6 x 384 (HF junnyu/roformer_chinese_small)",
        "roformer-tiny": "RoFormer, 2 x 128, embeddings 64, for tests",
    }
    hf_defaults = {"roformer": _HF_DEFAULTS}
    tokenizer = {"roformer": TokenizerDefaults("wordpiece", lowercase=True, specials=BERT_SPECIALS)}
    network = "mlmtool.models.roformer_flax:MaskedLM"
    head_modules = ("cls",)
    architecture_keys = ("model_type", "vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size",
                         "hidden_act", "layer_norm_eps", "pad_token_id", "rotary_value")
    document_attention = True  # segment_ids: rotary positions from 0 in each document, attention inside it
    shape_fields = (("vocab_size", ("embeddings", "word_embeddings", "embedding"), 0),
                    ("embedding_size", ("embeddings", "word_embeddings", "embedding"), 1),
                    ("max_position_embeddings", _EMBED_POSITIONS, 0),
                    ("type_vocab_size", ("embeddings", "token_type_embeddings", "embedding"), 0),
                    ("intermediate_size", ("encoder", "layer", "0", "intermediate", "dense", "kernel"), 1))
    layers_path = ("encoder", "layer")

    def parse_config(self, d: dict) -> RoFormerConfig:
        require_model_type(d, self.model_types)
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        return RoFormerConfig(**config_fields(RoFormerConfig, d))

    def no_weight_decay(self, path: tuple[str, ...], shape: tuple[int, ...]) -> bool:
        return path == _EMBED_POSITIONS or super().no_weight_decay(path, shape)  # the frozen sinusoidal table

    def weight_table(self, config: RoFormerConfig) -> WeightTable:
        """transformers v5 ``RoFormerForMaskedLM`` keys::

            roformer.embeddings.{word,token_type}_embeddings.weight [., E], roformer.embeddings.LayerNorm.*
            roformer.embeddings_project.*                 (E != H only)
            roformer.encoder.embed_positions.weight       [max_position_embeddings, head size] (sinusoidal)
            roformer.encoder.layer.<i>.*                  (BERT's block names)
            cls.predictions.transform.{dense [E, H], LayerNorm [E]}, cls.predictions.bias

        The tied decoder (``cls.predictions.decoder.*``) is not written.
        """
        E, H, I, V = config.decoder_width, config.hidden_size, config.intermediate_size, config.vocab_size
        e: list[WeightEntry] = [
            WeightEntry(("embeddings", "word_embeddings", "embedding"), "roformer.embeddings.word_embeddings.weight",
                        (V, E), ("vocab", "embedding")),
            WeightEntry(("embeddings", "token_type_embeddings", "embedding"),
                        "roformer.embeddings.token_type_embeddings.weight", (config.type_vocab_size, E),
                        ("types", "embedding")),
            *norm_entries(("embeddings", "LayerNorm"), "roformer.embeddings.LayerNorm", E),
        ]
        if config.projected:
            e += dense_entries(("embeddings_project",), "roformer.embeddings_project", E, H, ("embedding", "embed"))
        e.append(WeightEntry(_EMBED_POSITIONS, "roformer.encoder.embed_positions.weight",
                             (config.max_position_embeddings, config.head_dim), ("positions", "kv")))
        for i in range(config.num_hidden_layers):
            e += bert_layer_entries(("encoder", "layer", str(i)), f"roformer.encoder.layer.{i}", H, I)
        e += dense_entries(("cls", "transform", "dense"), "cls.predictions.transform.dense", H, E,
                           ("embed", "embedding"))
        e += norm_entries(("cls", "transform", "LayerNorm"), "cls.predictions.transform.LayerNorm", E)
        e.append(WeightEntry(("cls", "bias"), "cls.predictions.bias", (V,), ("vocab",)))
        return WeightTable(entries=tuple(e),
                           tied=(("cls.predictions.decoder.weight", "roformer.embeddings.word_embeddings.weight"),
                                 ("cls.predictions.decoder.bias", "cls.predictions.bias")))

    def parameter_count(self, hf: dict) -> int:
        H, I, V = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
        E = hf.get("embedding_size") or H
        P, T, L = hf.get("max_position_embeddings", 1536), hf.get("type_vocab_size", 2), hf["num_hidden_layers"]
        embeddings = (V + T) * E + 2 * E + ((E * H + H) if E != H else 0) + P * (H // hf["num_attention_heads"])
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        head = (H * E + E) + 2 * E + V
        return embeddings + L * layer + head

    def summary(self, hf: dict) -> dict:
        return {"model_type": hf["model_type"], "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"],
                "heads": hf["num_attention_heads"], "intermediate": hf["intermediate_size"],
                "embedding": hf.get("embedding_size") or hf["hidden_size"], "vocab": hf["vocab_size"],
                "max_positions": hf.get("max_position_embeddings", 1536)}

    def tiny_test_configs(self) -> dict[str, dict]:
        small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return {"roformer": {**_BASE, **small, "embedding_size": 16},  # embeddings_project
                "roformer-value": {**_BASE, **small, "embedding_size": 32, "rotary_value": True}}


FAMILY = RoFormerFamily()
