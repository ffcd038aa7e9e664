"""The ELECTRA family (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as
Discriminators Rather Than Generators", arXiv:2003.10555): BERT's post-LN encoder with an
``embedding_size`` that may differ from ``hidden_size`` (a projection ``embeddings_project``
between them), under transformers' ``ElectraForMaskedLM`` (the generator: dense H -> E, exact
GELU, LayerNorm, decoder tied to the word embeddings) and ``ElectraForPreTraining`` (the
discriminator: dense H -> H, ``hidden_act``, dense H -> 1, one logit per token: "was this
token replaced?").

A config.json of architecture ``ElectraForMaskedLM`` is a masked-language model like any
other.  One of architecture ``ElectraForPreTraining`` with a ``generator`` field (the
generator's sizes, e.g. ``{"hidden_size": 64, "num_attention_heads": 1,
"intermediate_size": 256}``; every other field is the discriminator's) is a generator and a
discriminator trained together with the replaced-token-detection objective
(``mlmtool.training.objectives``): they share the embedding module (token, position and token-type
tables and their LayerNorm, as the authors' code does), the export is the discriminator in
DIR and the generator in DIR/generator.  Without a ``generator`` field it is a
discriminator alone: it loads, exports and computes as transformers does, but cannot be
trained (there is nothing to make replacements).

This module holds the jax-free facts; the network is ``mlmtool.models.electra_flax``.
"""

from __future__ import annotations

import dataclasses
import math
from mlmtool.errors import ConfigError
from mlmtool.models.base import (
    Family,
    FamilyConfig,
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
from mlmtool.models.bert import ACTIVATION_NAMES, BERT_TOKENIZER, bert_layer_entries

MASKED_LM, PRE_TRAINING = "ElectraForMaskedLM", "ElectraForPreTraining"
#: The generator's own fields (the rest it takes from the discriminator: the shared
#: embeddings fix embedding_size, vocab_size, max_position_embeddings and type_vocab_size).
GENERATOR_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
#: The directory (and the weight-key prefix, ``mlmtool.hf_weights``) of the generator's export.
GENERATOR_PART = "generator"
RTD_WEIGHT = 50.0  # the paper's lambda: loss = MLM(generator) + 50 * RTD(discriminator)


@dataclasses.dataclass(frozen=True)
class ElectraConfig(FamilyConfig):
    """ELECTRA's config.json fields (defaults: transformers' ``ElectraConfig``)."""

    vocab_size: int
    embedding_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "electra"
    architecture: str = MASKED_LM
    generator: "ElectraConfig | None" = None  # PRE_TRAINING with a generator: the pair

    @property
    def decoder_width(self) -> int:
        return self.embedding_size

    @property
    def objective(self) -> str:
        """``mlmtool.training.objectives``' name: replaced-token detection for a generator + discriminator
        pair, the MLM for a generator alone; a discriminator alone has none."""
        if self.generator is not None:
            return "replaced-token-detection"
        return "mlm" if self.architecture == MASKED_LM else "none"

    @property
    def towers(self) -> dict[str, "ElectraConfig"]:
        """The encoders this config holds, by their parameter-tree name."""
        if self.architecture == MASKED_LM:
            return {"generator": self}
        out: dict[str, ElectraConfig] = {"discriminator": self}
        if self.generator is not None:
            out = {"generator": self.generator, **out}
        return out


_FLOATS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "initializer_range")


def _check(d: dict) -> None:
    require_positive_ints(d, ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                              "num_attention_heads", "intermediate_size", "max_position_embeddings"))
    require_positive_ints(d, ("type_vocab_size",), default=2)
    require_numbers(d, _FLOATS, positive=("layer_norm_eps", "initializer_range"),
                    probability=("hidden_dropout_prob", "attention_probs_dropout_prob"))
    act = d.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATION_NAMES:
        raise ConfigError(f"unsupported hidden_act {act!r}", hint=f"use one of {', '.join(ACTIVATION_NAMES)}")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ConfigError(f"hidden_size {d['hidden_size']} is not a multiple of num_attention_heads "
                          f"{d['num_attention_heads']}", "change one of them with --set")
    pad = d.get("pad_token_id", 0)
    if not is_int(pad) or not 0 <= pad < d["vocab_size"]:
        raise ConfigError(f"pad_token_id {pad!r} is outside the vocabulary (size {d['vocab_size']})")


def generator_config(hf: dict) -> dict:
    """The config.json of the generator of a pair (``ElectraForMaskedLM``, its own sizes)."""
    gen = hf["generator"]
    fields = {k: v for k, v in hf.items() if k not in ("generator", "architectures")}
    return {**fields, **gen, "architectures": [MASKED_LM]}


_DISCRIMINATOR = dict(model_type="electra", architectures=[PRE_TRAINING], vocab_size=30522, type_vocab_size=2,
                      max_position_embeddings=512, hidden_act="gelu", hidden_dropout_prob=0.1,
                      attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0)
# Clark et al. 2020, Table 7 (and google-research/electra's configure_pretraining.py): the
# discriminators; the generators are 1/4 (small, large) and 1/3 (base) of the hidden size,
# FFN size and heads, with as many layers.
_SIZES = {
    "small": (dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                   intermediate_size=1024), dict(hidden_size=64, num_attention_heads=1, intermediate_size=256)),
    "base": (dict(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072), dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024)),
    "large": (dict(embedding_size=1024, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096), dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024)),
    # 2 layers, discriminator 128 wide with 64-wide embeddings, generator 1/4: for tests and demos.
    "tiny": (dict(vocab_size=8192, embedding_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512), dict(hidden_size=32, num_attention_heads=1, intermediate_size=128)),
}

_HF_DEFAULTS = dict(
    architectures=None, output_hidden_states=False, return_dict=True, dtype=None, chunk_size_feed_forward=0,
    is_encoder_decoder=False, id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1},
    problem_type=None, vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12,
    num_attention_heads=4, intermediate_size=1024, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
    layer_norm_eps=1e-12, summary_type="first", summary_use_proj=True, summary_activation="gelu",
    summary_last_dropout=0.1, pad_token_id=0, use_cache=True, classifier_dropout=None, is_decoder=False,
    add_cross_attention=False, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
    model_type="electra", output_attentions=False,
)


class ElectraFamily(Family):
    name = "electra"
    model_types = {"electra": MASKED_LM}
    presets = {
        **{f"electra-{size}": {**_DISCRIMINATOR, **disc, "generator": {**gen}} for size, (disc, gen) in _SIZES.items()},
        **{f"electra-{size}-generator": {**_DISCRIMINATOR, **disc, **gen, "architectures": [MASKED_LM]}
           for size, (disc, gen) in _SIZES.items() if size != "tiny"},
    }
    preset_help = {
        "electra-small": "ELECTRA small: discriminator 12 x 256 (14M params), generator 1/4 (64 wide), "
                         "trained together (replaced-token detection)",
        "electra-base": "ELECTRA base: discriminator 12 x 768 (110M), generator 1/3 (256 wide)",
        "electra-large": "ELECTRA large: discriminator 24 x 1024 (335M), generator 1/4 (256 wide)",
        "electra-tiny": "ELECTRA, discriminator 2 x 128, generator 2 x 32, for tests and demos",
        "electra-small-generator": "ELECTRA small's generator alone, as a masked-language model",
        "electra-base-generator": "ELECTRA base's generator alone, as a masked-language model",
        "electra-large-generator": "ELECTRA large's generator alone, as a masked-language model",
    }
    hf_defaults = {"electra": _HF_DEFAULTS}
    extra_config_keys = ("generator",)
    #: BERT's WordPiece and class (transformers 5's ElectraTokenizer is BertTokenizer by another name)
    tokenizer = {"electra": BERT_TOKENIZER}
    network = "mlmtool.models.electra_flax:Electra"
    head_modules = ("generator",)  # unused: matmul_parameters is ours (the head is inside the tower)
    architecture_keys = ("model_type", "vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                         "num_attention_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size",
                         "hidden_act", "layer_norm_eps", "pad_token_id", "generator")
    document_attention = True
    document_attention_default = False
    rtd_weight = RTD_WEIGHT  # mlmtool.training.objectives.ReplacedTokenDetection's lambda
    objective_hint = (f"an {PRE_TRAINING} config needs a generator field to train (as 'mlmtool init DIR "
                      "--preset electra-small' writes)")
    generator_config = staticmethod(generator_config)

    def fields_from_shapes(self, shapes: dict[str, tuple]) -> dict[str, int]:
        """config.json's sizes from a tree of this family: the shared embeddings, then the
        discriminator's tower (a pair's top-level fields are the discriminator's), else the
        generator's; {} for another family's tree (no tower)."""
        towers = [t for t in ("discriminator", "generator") if any(k.startswith(f"['{t}']") for k in shapes)]
        if not towers:
            return {}
        layer = f"['{towers[0]}']['encoder']['layer']"
        where = {"vocab_size": ("['embeddings']['word_embeddings']['embedding']", 0),
                 "embedding_size": ("['embeddings']['word_embeddings']['embedding']", 1),
                 "max_position_embeddings": ("['embeddings']['position_embeddings']['embedding']", 0),
                 "type_vocab_size": ("['embeddings']['token_type_embeddings']['embedding']", 0),
                 "hidden_size": (f"{layer}['0']['attention']['self']['query']['kernel']", 1),
                 "intermediate_size": (f"{layer}['0']['intermediate']['dense']['kernel']", 1)}
        out = {}
        for field, (key, axis) in where.items():
            shape = shapes.get(key)
            if shape is None or len(shape) <= axis:
                return {}
            out[field] = shape[axis]
        out[self.layers_key] = len({k[len(layer):].split("]")[0] for k in shapes if k.startswith(layer)})
        return out

    def parse_config(self, d: dict) -> ElectraConfig:
        require_model_type(d, self.model_types)
        refuse(d, "tie_word_embeddings", (True,), "the generator's decoder is tied to the word embeddings")
        refuse(d, "position_embedding_type", ("absolute",), "only absolute position embeddings are implemented")
        refuse(d, "is_decoder", (False,), "this is a bidirectional encoder")
        refuse(d, "add_cross_attention", (False,), "no cross-attention in an encoder")
        architectures = d.get("architectures") or [MASKED_LM]
        if not isinstance(architectures, list) or architectures[0] not in (MASKED_LM, PRE_TRAINING):
            raise ConfigError(f"config architectures {architectures!r} is not supported",
                              f"use [{MASKED_LM!r}] (a masked-language model) or [{PRE_TRAINING!r}] (ELECTRA "
                              "pre-training, with a generator field)")
        gen = d.get("generator")
        if gen is not None:
            if architectures[0] != PRE_TRAINING:
                raise ConfigError(f"config generator is set but architectures is {architectures!r}",
                                  f"set architectures to [{PRE_TRAINING!r}], or remove the generator field")
            if not isinstance(gen, dict) or set(gen) - set(GENERATOR_FIELDS):
                raise ConfigError(f"config generator must be an object of {', '.join(GENERATOR_FIELDS)}, got {gen!r}",
                                  "the generator shares everything else (embeddings, vocabulary) with the "
                                  "discriminator")
        kwargs = config_fields(ElectraConfig, d, architecture=architectures[0], generator=None)
        _check(kwargs)
        if gen is not None:
            g = {**kwargs, **gen, "architecture": MASKED_LM}
            try:
                _check(g)
            except ConfigError as e:
                raise ConfigError(f"the generator's {e.message}", "fix the generator field of config.json") from None
            kwargs["generator"] = ElectraConfig(**g)
        return ElectraConfig(**kwargs)

    def weight_table(self, config: ElectraConfig) -> WeightTable:
        """The HF state dict (v5 ``save_pretrained``)::

            electra.embeddings.{word,position,token_type}_embeddings.weight  [rows, E]
            electra.embeddings.LayerNorm.*, electra.embeddings_project.* (E != H only)
            electra.encoder.layer.<i>.* (BERT's names)
            ElectraForMaskedLM:    generator_predictions.{dense,LayerNorm}.*, generator_lm_head.bias
                                   (generator_lm_head.weight: tied to the word embeddings)
            ElectraForPreTraining: discriminator_predictions.{dense,dense_prediction}.*

        For a pair the generator's keys carry the prefix ``generator/`` (its own file,
        DIR/generator/model.safetensors, ``mlmtool.hf_weights``), the shared embeddings once
        in each file."""
        towers = config.towers
        e: list[WeightEntry] = []
        tied = []
        for tower, cfg in towers.items():
            pre = f"{GENERATOR_PART}/" if len(towers) > 1 and tower == "generator" else ""
            e += _embedding_entries(config, pre)
            e += _tower_entries(cfg, (tower,), f"{pre}electra")
            E, H = cfg.embedding_size, cfg.hidden_size
            if tower == "generator":
                head = (tower, "generator_predictions")
                e += dense_entries((*head, "dense"), f"{pre}generator_predictions.dense", H, E,
                                   ("embed", "embedding"))
                e += norm_entries((*head, "LayerNorm"), f"{pre}generator_predictions.LayerNorm", E)
                e.append(WeightEntry((tower, "generator_lm_head", "bias"), f"{pre}generator_lm_head.bias",
                                     (cfg.vocab_size,), ("vocab",)))
                tied.append((f"{pre}generator_lm_head.weight", f"{pre}electra.embeddings.word_embeddings.weight"))
            else:
                head = (tower, "discriminator_predictions")
                e += dense_entries((*head, "dense"), "discriminator_predictions.dense", H, H,
                                   ("embed", "embed"))
                e += dense_entries((*head, "dense_prediction"), "discriminator_predictions.dense_prediction", H, 1,
                                   ("embed", "classes"))
        return WeightTable(entries=tuple(e), tied=tuple(tied),
                           ignored=r"(^|/)electra\.embeddings\.(position_ids|token_type_ids)$",
                           renames=((r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight"),
                                    (r"(LayerNorm|layer_norm)\.beta$", r"\1.bias")))

    def parameter_count(self, hf: dict) -> int:
        config = self.parse_config(hf)
        V, E = config.vocab_size, config.embedding_size
        total = (V + config.max_position_embeddings + config.type_vocab_size) * E + 2 * E
        for tower, cfg in config.towers.items():
            H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
            total += (E * H + H if E != H else 0) + L * (4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H)
            total += (H * E + E) + 2 * E + V if tower == "generator" else (H * H + H) + (H + 1)
        return total

    def summary(self, hf: dict) -> dict:
        out = {"model_type": hf["model_type"], "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"],
               "heads": hf["num_attention_heads"], "intermediate": hf["intermediate_size"],
               "embedding": hf["embedding_size"], "vocab": hf["vocab_size"],
               "max_positions": hf["max_position_embeddings"]}
        gen = hf.get("generator")
        if isinstance(gen, dict):
            out["generator"] = " x ".join(str(gen.get(k, hf.get(k))) for k in ("num_hidden_layers", "hidden_size"))
        return out

    def matmul_parameters(self, config: ElectraConfig) -> tuple[int, int]:
        """(per-token, MLM head) parameters for FLOPs: the generator's head and tied decoder
        run on the masked slots only; both encoders and the discriminator's head run on every
        token.  The embedding tables (the generator's copy of the shared ones too) are lookups."""
        encoder = head = 0
        for e in self.weight_table(config).entries:
            if e.path[0] == "embeddings" and (e.path[-1] == "embedding" or e.hf_key.startswith(f"{GENERATOR_PART}/")):
                continue
            if e.path[1] in ("generator_predictions", "generator_lm_head"):
                head += math.prod(e.shape)
            else:
                encoder += math.prod(e.shape)
        if "generator" in config.towers:
            head += config.vocab_size * config.decoder_width
        return encoder, head

    def recipe_hint(self, model_type: str) -> str | None:
        return None

    def tiny_test_configs(self) -> dict[str, dict]:
        return {"electra": dict(model_type="electra", architectures=[MASKED_LM], vocab_size=96, embedding_size=16,
                                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, hidden_act="gelu_new")}


def _embedding_entries(config: ElectraConfig, pre: str) -> list[WeightEntry]:
    E = config.embedding_size
    e = [WeightEntry(("embeddings", name, "embedding"), f"{pre}electra.embeddings.{name}.weight", (rows, E),
                     (axis, "embedding"))
         for name, rows, axis in (("word_embeddings", config.vocab_size, "vocab"),
                                  ("position_embeddings", config.max_position_embeddings, "positions"),
                                  ("token_type_embeddings", config.type_vocab_size, "types"))]
    return e + norm_entries(("embeddings", "LayerNorm"), f"{pre}electra.embeddings.LayerNorm", E)


def _tower_entries(cfg: ElectraConfig, ours: tuple[str, ...], p: str) -> list[WeightEntry]:
    E, H, I = cfg.embedding_size, cfg.hidden_size, cfg.intermediate_size
    e: list[WeightEntry] = []
    if E != H:
        e += dense_entries((*ours, "embeddings_project"), f"{p}.embeddings_project", E, H, ("embedding", "embed"))
    for i in range(cfg.num_hidden_layers):
        e += bert_layer_entries((*ours, "encoder", "layer", str(i)), f"{p}.encoder.layer.{i}", H, I)
    return e


FAMILY = ElectraFamily()
