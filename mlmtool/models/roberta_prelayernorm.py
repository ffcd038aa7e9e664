"""The RoBERTa-PreLayerNorm family (fairseq's ``--encoder-normalize-before`` RoBERTa, as in
Wettig et al. 2022, "Should You Mask 15% in Masked Language Modeling?", arXiv:2202.08005):
RoBERTa's embeddings, position ids, head and byte-level BPE, with pre-norm blocks (a
LayerNorm before the attention and before the feed-forward, none after the residual sums)
and a final LayerNorm over the encoder's output.  transformers' ``RobertaPreLayerNormForMaskedLM``;
the network is ``mlmtool.models.roberta_prelayernorm_flax``.
"""

from __future__ import annotations

import dataclasses

from mlmtool.models.base import (
    Family,
    WeightEntry,
    WeightTable,
    config_fields,
    dense_entries,
    norm_entries,
    refuse,
    require_model_type,
)
from mlmtool.models.bert import FAMILY as BERT, BertConfig, BertFamily, Variant, check_fields

VARIANT = Variant("RobertaPreLayerNormForMaskedLM", "roberta_prelayernorm", True)


@dataclasses.dataclass(frozen=True)
class RobertaPreLayerNormConfig(BertConfig):
    """BERT's fields (RoBERTa's defaults), under model_type ``roberta-prelayernorm``."""

    def __post_init__(self) -> None:
        check_fields(dataclasses.asdict(self), roberta=True)

    @property
    def variant(self) -> Variant:
        return VARIANT


# RoBERTa-base's sizes and ids (andreasmadsen/efficient_mlm_m0.40's config, Wettig et al.)
_BASE = dict(
    model_type="roberta-prelayernorm", architectures=["RobertaPreLayerNormForMaskedLM"], vocab_size=50265,
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=514, type_vocab_size=1,
    initializer_range=0.02, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2,
)
_HF_DEFAULTS = {
    "add_cross_attention": False, "architectures": None, "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
    "chunk_size_feed_forward": 0, "classifier_dropout": None, "dtype": None, "eos_token_id": 2, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02, "intermediate_size": 3072, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "roberta-prelayernorm", "num_attention_heads": 12, "num_hidden_layers": 12,
    "output_attentions": False, "output_hidden_states": False, "pad_token_id": 1, "problem_type": None,
    "return_dict": True, "tie_word_embeddings": True, "type_vocab_size": 2, "use_cache": True, "vocab_size": 50265,
}


class RobertaPreLayerNormFamily(Family):
    name = "roberta-prelayernorm"
    model_types = {"roberta-prelayernorm": VARIANT.architecture}
    presets = {
        "roberta-prelayernorm-base": _BASE,
        "roberta-prelayernorm-large": {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24,
                                       "num_attention_heads": 16, "intermediate_size": 4096},
        "roberta-prelayernorm-tiny": {**_BASE, "vocab_size": 8192, "hidden_size": 128, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "intermediate_size": 512},
    }
    preset_help = {
        "roberta-prelayernorm-base": "pre-norm RoBERTa base, 125M params (as andreasmadsen/efficient_mlm_m0.40)",
        "roberta-prelayernorm-large": "pre-norm RoBERTa large, 355M params",
        "roberta-prelayernorm-tiny": "pre-norm RoBERTa, 2 x 128, for tests",
    }
    hf_defaults = {"roberta-prelayernorm": _HF_DEFAULTS}
    tokenizer = {"roberta-prelayernorm": BertFamily.tokenizer["roberta"]}  # RoBERTa's byte-level BPE
    network = "mlmtool.models.roberta_prelayernorm_flax:MaskedLM"
    head_modules = ("lm_head",)
    architecture_keys = BertFamily.architecture_keys
    document_attention = True  # segment_ids: positions restart per document, attention stays inside
    shape_fields = BertFamily.shape_fields
    layers_path = BertFamily.layers_path

    def parse_config(self, d: dict) -> RobertaPreLayerNormConfig:
        require_model_type(d, self.model_types)
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        refuse(d, "position_embedding_type", ("absolute",), "only absolute position embeddings are implemented")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        return RobertaPreLayerNormConfig(**config_fields(RobertaPreLayerNormConfig, d))

    def weight_table(self, config: RobertaPreLayerNormConfig) -> WeightTable:
        """transformers v5 ``RobertaPreLayerNormForMaskedLM`` keys (``P`` = roberta_prelayernorm)::

            P.embeddings.{word,position,token_type}_embeddings.weight, P.embeddings.LayerNorm.*
            P.encoder.layer.<i>.attention.{LayerNorm, self.{query,key,value}, output.dense}.*
            P.encoder.layer.<i>.intermediate.{LayerNorm, dense}.*, .output.dense.*
            P.LayerNorm.*  (the final one), lm_head.{dense, layer_norm, bias}

        The tied decoder (``lm_head.decoder.*``) is not written; buffers and a pooler are ignored.
        """
        H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
        p = VARIANT.prefix
        e: list[WeightEntry] = []
        for name, rows, axis in (("word_embeddings", V, "vocab"),
                                 ("position_embeddings", config.max_position_embeddings, "positions"),
                                 ("token_type_embeddings", config.type_vocab_size, "types")):
            e.append(WeightEntry(("embeddings", name, "embedding"), f"{p}.embeddings.{name}.weight", (rows, H),
                                 (axis, "embed")))
        e += norm_entries(("embeddings", "LayerNorm"), f"{p}.embeddings.LayerNorm", H)
        for i in range(config.num_hidden_layers):
            ours, hf = ("encoder", "layer", str(i)), f"{p}.encoder.layer.{i}"
            e += norm_entries((*ours, "attention", "LayerNorm"), f"{hf}.attention.LayerNorm", H)
            for proj in ("query", "key", "value"):
                e += dense_entries((*ours, "attention", "self", proj), f"{hf}.attention.self.{proj}", H, H,
                                   ("embed", "heads"))
            e += dense_entries((*ours, "attention", "output", "dense"), f"{hf}.attention.output.dense", H, H,
                               ("heads", "embed"))
            e += norm_entries((*ours, "intermediate", "LayerNorm"), f"{hf}.intermediate.LayerNorm", H)
            e += dense_entries((*ours, "intermediate", "dense"), f"{hf}.intermediate.dense", H, I, ("embed", "mlp"))
            e += dense_entries((*ours, "output", "dense"), f"{hf}.output.dense", I, H, ("mlp", "embed"))
        e += norm_entries(("LayerNorm",), f"{p}.LayerNorm", H)
        e += dense_entries(("lm_head", "dense"), "lm_head.dense", H, H, ("embed", "embed"))
        e += norm_entries(("lm_head", "layer_norm"), "lm_head.layer_norm", H)
        e.append(WeightEntry(("lm_head", "bias"), "lm_head.bias", (V,), ("vocab",)))
        return WeightTable(
            entries=tuple(e),
            tied=(("lm_head.decoder.weight", f"{p}.embeddings.word_embeddings.weight"),
                  ("lm_head.decoder.bias", "lm_head.bias")),
            ignored=rf"^{p}\.embeddings\.(position_ids|token_type_ids)$|^{p}\.pooler\.")

    def parameter_count(self, hf: dict) -> int:
        H, I, V = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
        P, T, L = hf["max_position_embeddings"], hf.get("type_vocab_size", 2), hf["num_hidden_layers"]
        embeddings = (V + P + T) * H + 2 * H
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        head = (H * H + H) + 2 * H + V
        return embeddings + L * layer + 2 * H + head

    def summary(self, hf: dict) -> dict:
        return BERT.summary(hf)

    def tiny_test_configs(self) -> dict[str, dict]:
        return {"roberta-prelayernorm": {**_BASE, "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "intermediate_size": 64,
                                         "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
                                         "attention_probs_dropout_prob": 0.0}}


FAMILY = RobertaPreLayerNormFamily()
