"""The BigBird family (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences",
arXiv:2007.14062) with full attention: transformers' ``BigBirdForMaskedLM`` under
``attention_type="original_full"`` is BERT's network exactly (state-dict prefix ``bert``,
positions from 0, the ``cls.predictions`` head), with 4096 positions and a SentencePiece
vocabulary, so the network is ``bert_flax``'s (``big_bird_flax`` adds the pooler transformers' class carries).

Block-sparse attention (``attention_type="block_sparse"``, transformers' default, with
``block_size`` and ``num_random_blocks``) is not implemented: a config must say
``original_full``, and one that says (or defaults to) ``block_sparse`` is refused naming the
field.  ``use_bias=false`` and ``rescale_embeddings=true`` are refused likewise.  The
tokenizer is Unigram with BigBird's specials (``<pad> <s> </s> <unk> [CLS] [SEP] [MASK]``,
``[CLS] A [SEP]``).
"""

from __future__ import annotations

import dataclasses

from mlmtool.errors import ConfigError
from mlmtool.models.base import (
    Family,
    SpecialTokens,
    TokenizerDefaults,
    WeightTable,
    config_fields,
    dense_entries,
    refuse,
    require_model_type,
)
from mlmtool.models.bert import FAMILY as BERT, BertConfig, BertFamily, Variant, check_fields

VARIANT = Variant("BigBirdForMaskedLM", "bert", False)


@dataclasses.dataclass(frozen=True)
class BigBirdConfig(BertConfig):
    """BERT's fields, under model_type ``big_bird`` (full attention only)."""

    def __post_init__(self) -> None:
        check_fields(dataclasses.asdict(self), roberta=False)

    @property
    def variant(self) -> Variant:
        return VARIANT


#: google/bigbird-roberta-base's conventions: [CLS] A [SEP], a [MASK] that eats the space before it
BIG_BIRD_SPECIALS = SpecialTokens(pad="<pad>", unk="<unk>", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                                  order=("<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]"),
                                  bos="<s>", eos="</s>", mask_lstrip=True)

# google/bigbird-roberta-base, with full attention
_BASE = dict(
    model_type="big_bird", architectures=["BigBirdForMaskedLM"], vocab_size=50358, hidden_size=768,
    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu_new",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=4096, type_vocab_size=2,
    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=66,
    attention_type="original_full", use_bias=True, rescale_embeddings=False,
)
_HF_DEFAULTS = {
    "add_cross_attention": False, "architectures": None, "attention_probs_dropout_prob": 0.1,
    "attention_type": "block_sparse", "block_size": 64, "bos_token_id": 1, "chunk_size_feed_forward": 0,
    "classifier_dropout": None, "dtype": None, "eos_token_id": 2, "hidden_act": "gelu_new", "hidden_dropout_prob": 0.1,
    "hidden_size": 768, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_range": 0.02,
    "intermediate_size": 3072, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-12, "max_position_embeddings": 4096,
    "model_type": "big_bird", "num_attention_heads": 12, "num_hidden_layers": 12, "num_random_blocks": 3,
    "output_attentions": False, "output_hidden_states": False, "pad_token_id": 0, "problem_type": None,
    "rescale_embeddings": False, "return_dict": True, "sep_token_id": 66, "tie_word_embeddings": True,
    "type_vocab_size": 2, "use_bias": True, "use_cache": True, "vocab_size": 50358,
}


class BigBirdFamily(Family):
    name = "big_bird"
    model_types = {"big_bird": VARIANT.architecture}
    presets = {
        "big-bird-base": _BASE,
        "big-bird-large": {**_BASE, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                           "intermediate_size": 4096},
        "big-bird-tiny": {**_BASE, "vocab_size": 8192, "hidden_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 1024},
    }
    preset_help = {
        "big-bird-base": "BigBird base, full attention, 4096 positions, 128M params (HF google/bigbird-roberta-base)",
        "big-bird-large": "BigBird large, full attention (HF google/bigbird-roberta-large)",
        "big-bird-tiny": "BigBird, 2 x 128, full attention, for tests",
    }
    hf_defaults = {"big_bird": _HF_DEFAULTS}
    tokenizer = {"big_bird": TokenizerDefaults("unigram", specials=BIG_BIRD_SPECIALS,
                                               config_ids=(("pad_token_id", "pad"), ("bos_token_id", "bos"),
                                                           ("eos_token_id", "eos"), ("sep_token_id", "sep")))}
    network = "mlmtool.models.big_bird_flax:MaskedLM"  # BERT's network, under full attention, and a pooler
    head_modules = BertFamily.head_modules
    architecture_keys = BertFamily.architecture_keys
    document_attention = True  # segment_ids: positions restart per document, attention stays inside
    shape_fields = BertFamily.shape_fields
    layers_path = BertFamily.layers_path

    def parse_config(self, d: dict) -> BigBirdConfig:
        require_model_type(d, self.model_types)
        if d.get("attention_type", "block_sparse") != "original_full":
            raise ConfigError(f"config attention_type={d.get('attention_type', 'block_sparse')!r} is not supported "
                              "(block-sparse attention is not implemented; transformers' default is block_sparse)",
                              "set attention_type to 'original_full' (--set attention_type=original_full)")
        refuse(d, "use_bias", (True,), "the query/key/value projections have biases")
        refuse(d, "rescale_embeddings", (False,), "the word embeddings are not rescaled")
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        refuse(d, "position_embedding_type", ("absolute",), "only absolute position embeddings are implemented")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        return BigBirdConfig(**config_fields(BigBirdConfig, d))

    def weight_table(self, config: BigBirdConfig) -> WeightTable:
        """BERT's keys (``bert.*``, ``cls.predictions.*``: ``BertFamily.weight_table``) and the
        pooler ``bert.pooler.{weight,bias}`` (BigBirdForMaskedLM has one; the MLM does not use it)."""
        bert = BERT.weight_table(config)
        H = config.hidden_size
        return dataclasses.replace(bert, entries=(*bert.entries, *dense_entries(("pooler",), "bert.pooler", H, H,
                                                                                         ("embed", "embed"))),
                                   ignored=bert.ignored.replace(r"|^bert\.pooler\.", ""))

    def parameter_count(self, hf: dict) -> int:
        return BERT.parameter_count(hf) + hf["hidden_size"] * (hf["hidden_size"] + 1)  # + the pooler

    def summary(self, hf: dict) -> dict:
        return BERT.summary(hf)

    def tiny_test_configs(self) -> dict[str, dict]:
        return {"big_bird": {**_BASE, "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 40,
                             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


FAMILY = BigBirdFamily()
