"""The DistilBERT family (Sanh et al. 2019, "DistilBERT, a distilled version of BERT",
arXiv:1910.01108): BERT's post-LN blocks, half the layers, no token types, its own config
schema (``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``, ``activation``, ``dropout``,
``attention_dropout``) and key names (``q_lin``, ``sa_layer_norm``, ``ffn.lin1``,
``vocab_projector``), LayerNorm epsilon fixed at 1e-12.

mlmtool pre-trains it with the MLM loss alone (the paper's distillation losses need a
teacher); the result is a ``DistilBertForMaskedLM`` directory.  The network is
``mlmtool.models.distilbert_flax``.
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
    is_int,
    norm_entries,
    refuse,
    require_model_type,
    require_numbers,
    require_positive_ints,
)
from mlmtool.models.bert import ACTIVATION_NAMES

LAYER_NORM_EPS = 1e-12  # hard-coded in transformers' DistilBERT modules


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(FamilyConfig):
    """DistilBERT's ``config.json`` fields (defaults: distilbert-base-uncased's)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # 4 * dim
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "distilbert"

    def __post_init__(self) -> None:
        _check(dataclasses.asdict(self))

    layer_norm_eps = LAYER_NORM_EPS

    # FamilyConfig's names in DistilBERT's spelling
    @property
    def hidden_size(self) -> int:  # pyright: ignore[reportIncompatibleVariableOverride] (read-only here)
        return self.dim

    @property
    def num_layers(self) -> int:
        return self.n_layers

    @property
    def num_heads(self) -> int:
        return self.n_heads


def _check(d: dict) -> None:
    require_positive_ints(d, ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings"))
    require_numbers(d, ("dropout", "attention_dropout", "initializer_range"), positive=("initializer_range",),
                    probability=("dropout", "attention_dropout"))
    if d.get("activation", "gelu") not in ACTIVATION_NAMES:
        raise ConfigError(f"unsupported activation {d.get('activation')!r}",
                          hint=f"use one of {', '.join(ACTIVATION_NAMES)}")
    if d["dim"] % d["n_heads"]:
        raise ConfigError(f"dim {d['dim']} is not a multiple of n_heads {d['n_heads']}",
                          "change one of them with --set")
    pad = d.get("pad_token_id", 0)
    if not is_int(pad) or not 0 <= pad < d["vocab_size"]:
        raise ConfigError(f"pad_token_id {pad!r} is outside the vocabulary (size {d['vocab_size']})")


_DISTILBERT = dict(
    model_type="distilbert", architectures=["DistilBertForMaskedLM"], vocab_size=30522, dim=768, n_layers=6,
    n_heads=12, hidden_dim=3072, activation="gelu", dropout=0.1, attention_dropout=0.1, max_position_embeddings=512,
    initializer_range=0.02, sinusoidal_pos_embds=False, pad_token_id=0,
)
_TINY = dict(vocab_size=8192, dim=128, n_layers=2, n_heads=2, hidden_dim=512)


class DistilBertFamily(Family):
    name = "distilbert"
    model_types = {"distilbert": "DistilBertForMaskedLM"}
    presets = {"distilbert-base": _DISTILBERT, "distilbert-tiny": {**_DISTILBERT, **_TINY}}
    preset_help = {"distilbert-base": "DistilBERT base uncased, 67M params (HF distilbert-base-uncased)",
                   "distilbert-tiny": "DistilBERT, 2 x 128, for tests"}
    hf_defaults = {"distilbert": {
        "activation": "gelu", "architectures": None, "attention_dropout": 0.1,
        "bos_token_id": None, "chunk_size_feed_forward": 0, "dim": 768, "dropout": 0.1, "dtype": None,
        "eos_token_id": None, "hidden_dim": 3072, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_range": 0.02, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "max_position_embeddings": 512, "model_type": "distilbert",
        "n_heads": 12, "n_layers": 6, "output_attentions": False, "output_hidden_states": False, "pad_token_id": 0,
        "problem_type": None, "qa_dropout": 0.1, "return_dict": True, "seq_classif_dropout": 0.2,
        "sinusoidal_pos_embds": False, "tie_word_embeddings": True, "vocab_size": 30522,
    }}
    tokenizer = {"distilbert": TokenizerDefaults(
        "wordpiece", lowercase=True, specials=BERT_SPECIALS, hf_class="DistilBertTokenizer",
        hf_fields=(("strip_accents", None), ("tokenize_chinese_chars", True)), hf_lowercase=True,
        clean_up_tokenization_spaces=True)}  # no token types: DistilBERT has no segment embeddings
    network = "mlmtool.models.distilbert_flax:MaskedLM"
    head_modules = ("vocab_transform", "vocab_layer_norm", "vocab_projector")
    layers_key = "n_layers"
    architecture_keys = ("model_type", "vocab_size", "dim", "n_layers", "n_heads", "hidden_dim",
                         "max_position_embeddings", "activation", "pad_token_id")
    document_attention = True  # segment_ids: positions restart per document, attention stays inside
    document_attention_default = False  # the published recipe packs across documents
    shape_fields = (("vocab_size", ("embeddings", "word_embeddings", "embedding"), 0),
                    ("dim", ("embeddings", "word_embeddings", "embedding"), 1),
                    ("max_position_embeddings", ("embeddings", "position_embeddings", "embedding"), 0),
                    ("hidden_dim", ("transformer", "layer", "0", "ffn", "lin1", "kernel"), 1))
    layers_path = ("transformer", "layer")

    def parse_config(self, d: dict) -> DistilBertConfig:
        require_model_type(d, self.model_types)
        refuse(d, "sinusoidal_pos_embds", (False,), "only learned position embeddings are implemented")
        refuse(d, "tie_word_embeddings", (True,), "the MLM decoder is tied to the word embeddings")
        return DistilBertConfig(**config_fields(DistilBertConfig, d))

    def weight_table(self, config: DistilBertConfig) -> WeightTable:
        """transformers v5 ``DistilBertForMaskedLM`` keys::

            distilbert.embeddings.{word,position}_embeddings.weight, distilbert.embeddings.LayerNorm.*
            distilbert.transformer.layer.<i>.attention.{q_lin,k_lin,v_lin,out_lin}.*
            distilbert.transformer.layer.<i>.{sa_layer_norm,output_layer_norm}.*, .ffn.{lin1,lin2}.*
            vocab_transform.*, vocab_layer_norm.*, vocab_projector.bias

        ``vocab_projector.weight`` is tied to the word embeddings (not written; accepted on
        input when equal); the ``position_ids`` buffer of old checkpoints is ignored.
        """
        H, I, V = config.dim, config.hidden_dim, config.vocab_size
        e: list[WeightEntry] = [
            WeightEntry(("embeddings", "word_embeddings", "embedding"), "distilbert.embeddings.word_embeddings.weight",
                        (V, H), ("vocab", "embed")),
            WeightEntry(("embeddings", "position_embeddings", "embedding"),
                        "distilbert.embeddings.position_embeddings.weight", (config.max_position_embeddings, H),
                        ("positions", "embed")),
            *norm_entries(("embeddings", "LayerNorm"), "distilbert.embeddings.LayerNorm", H),
        ]
        for i in range(config.n_layers):
            ours, hf = ("transformer", "layer", str(i)), f"distilbert.transformer.layer.{i}"
            for proj in ("q_lin", "k_lin", "v_lin", "out_lin"):
                e += dense_entries((*ours, "attention", proj), f"{hf}.attention.{proj}", H, H,
                                   ("heads", "embed") if proj == "out_lin" else ("embed", "heads"))
            e += norm_entries((*ours, "sa_layer_norm"), f"{hf}.sa_layer_norm", H)
            e += dense_entries((*ours, "ffn", "lin1"), f"{hf}.ffn.lin1", H, I, ("embed", "mlp"))
            e += dense_entries((*ours, "ffn", "lin2"), f"{hf}.ffn.lin2", I, H, ("mlp", "embed"))
            e += norm_entries((*ours, "output_layer_norm"), f"{hf}.output_layer_norm", H)
        e += dense_entries(("vocab_transform",), "vocab_transform", H, H, ("embed", "embed"))
        e += norm_entries(("vocab_layer_norm",), "vocab_layer_norm", H)
        e.append(WeightEntry(("vocab_projector", "bias"), "vocab_projector.bias", (V,), ("vocab",)))
        return WeightTable(entries=tuple(e),
                           tied=(("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),),
                           ignored=r"^distilbert\.embeddings\.position_ids$")

    def parameter_count(self, hf: dict) -> int:
        H, I, V, P, L = hf["dim"], hf["hidden_dim"], hf["vocab_size"], hf["max_position_embeddings"], hf["n_layers"]
        embeddings = (V + P) * H + 2 * H
        layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
        head = (H * H + H) + 2 * H + V
        return embeddings + L * layer + head

    def summary(self, hf: dict) -> dict:
        return {"model_type": hf["model_type"], "layers": hf["n_layers"], "hidden": hf["dim"], "heads": hf["n_heads"],
                "intermediate": hf["hidden_dim"], "vocab": hf["vocab_size"],
                "max_positions": hf["max_position_embeddings"]}

    def tiny_test_configs(self) -> dict[str, dict]:
        return {"distilbert": {**_DISTILBERT, "vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4,
                               "hidden_dim": 64, "max_position_embeddings": 40, "dropout": 0.0,
                               "attention_dropout": 0.0}}


FAMILY = DistilBertFamily()
