"""What a model family is: the interface each ``mlmtool/models/<family>.py`` provides.

Everything here is jax-free: ``init``, ``info``, ``tokenizer`` and ``prepare`` read a
family's facts (presets, config checks, parameter count, tokenizer conventions) without
paying for jax or transformers.  The family's network lives in ``<family>_flax.py`` and is
imported only when a model is built (``mlmtool.models.load_model``).

A family module defines ``FAMILY``, an instance of a :class:`Family` subclass; the registry
(``mlmtool.models``) lists the modules.  Generic code (train, eval, predict, init --from,
info, the benchmarks) only ever calls the registry and the methods below.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from typing import Any, NamedTuple, TypeGuard

from mlmtool.errors import ConfigError

# --------------------------------------------------------------------------- tokenizers


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Special token strings of a tokenizer convention, in id order (ids 0..n-1)."""

    pad: str
    unk: str
    cls: str          # first token of every encoded sequence (<s> / [CLS])
    sep: str          # last token of every encoded sequence (</s> / [SEP])
    mask: str
    order: tuple[str, ...]
    bos: str | None = None
    eos: str | None = None
    #: post-processor: "roberta" (``<s> A </s></s> B </s>``, RobertaProcessing) or "bert"
    #: (``[CLS] A [SEP] B [SEP]`` with token types, TemplateProcessing)
    processor: str = "bert"
    #: the mask token eats the space before it ("Hello <mask>" masks " world"), as RoBERTa's
    mask_lstrip: bool = False

    def hf_kwargs(self) -> dict[str, str]:
        """Keyword arguments naming the special tokens for a transformers tokenizer."""
        out = {"unk_token": self.unk, "pad_token": self.pad, "cls_token": self.cls,
               "sep_token": self.sep, "mask_token": self.mask}
        if self.bos is not None:
            out["bos_token"] = self.bos
        if self.eos is not None:
            out["eos_token"] = self.eos
        return out

    def role(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise KeyError(name)
        return value


#: RoBERTa's (fairseq's) convention: <s> <pad> </s> <unk>, <mask> last.  XLM-R's Unigram
#: tokenizer has the same five (its <mask> is the last id of a 250k vocabulary).
ROBERTA_SPECIALS = SpecialTokens(pad="<pad>", unk="<unk>", cls="<s>", sep="</s>", mask="<mask>",
                                 order=("<s>", "<pad>", "</s>", "<unk>", "<mask>"), bos="<s>", eos="</s>",
                                 processor="roberta", mask_lstrip=True)
#: BERT's: [PAD] [UNK] [CLS] [SEP] [MASK] (in BERT's vocab.txt they are ids 0, 100-103).
BERT_SPECIALS = SpecialTokens(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]",
                              order=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))

ALGORITHMS = ("bpe", "wordpiece", "unigram")
#: The specials that go with an algorithm when the family does not fix them.
ALGORITHM_SPECIALS = {"bpe": ROBERTA_SPECIALS, "wordpiece": BERT_SPECIALS, "unigram": ROBERTA_SPECIALS}


@dataclasses.dataclass(frozen=True)
class TokenizerDefaults:
    """How ``mlmtool tokenizer`` trains a family's tokenizer by default."""

    algorithm: str                         # "bpe" (byte-level) | "wordpiece" | "unigram"
    lowercase: bool = False
    specials: SpecialTokens | None = None  # None: ALGORITHM_SPECIALS[algorithm], whichever --type
    #: config.json fields set from the trained tokenizer: (field, SpecialTokens attribute)
    config_ids: tuple[tuple[str, str], ...] = (("pad_token_id", "pad"),)
    #: the family's own transformers tokenizer class, named in tokenizer_config.json when the
    #: tokenizer is the one that class builds (the family's algorithm; lowercased only where
    #: the class has ``do_lower_case``), and that class's own fields there
    hf_class: str = "PreTrainedTokenizerFast"
    hf_fields: tuple[tuple[str, Any], ...] = ()
    #: the class rebuilds a lowercasing normalizer from ``do_lower_case`` (BERT's WordPiece)
    hf_lowercase: bool = False
    #: what the model's forward takes (transformers' ``model_input_names``) and how decode
    #: cleans spaces, whichever class names the tokenizer
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    clean_up_tokenization_spaces: bool = False

    def specials_for(self, algorithm: str) -> SpecialTokens:
        if self.specials is not None and algorithm == self.algorithm:
            return self.specials
        return ALGORITHM_SPECIALS[algorithm]

    def tokenizer_config(self, algorithm: str, lowercase: bool) -> dict[str, Any]:
        """The tokenizer_config.json fields beyond the special tokens: the family's class
        and its fields when a tokenizer of ``algorithm``/``lowercase`` is the one that class
        builds, else ``PreTrainedTokenizerFast`` (which loads tokenizer.json as it is: the
        model classes of transformers 5 rebuild the pipeline and would drop, e.g., a
        Lowercase normalizer RoBERTa's class has no field for)."""
        out: dict[str, Any] = {"model_input_names": list(self.model_input_names),
                               "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        if algorithm == self.algorithm and (self.hf_lowercase or lowercase == self.lowercase):
            out |= {"tokenizer_class": self.hf_class, **dict(self.hf_fields)}
            if self.hf_lowercase:
                out["do_lower_case"] = lowercase
        else:
            out["tokenizer_class"] = "PreTrainedTokenizerFast"
        return out


# --------------------------------------------------------------------------- weights


class WeightEntry(NamedTuple):
    path: tuple[str, ...]       # key path in our params tree
    hf_key: str                 # transformers state_dict key
    shape: tuple[int, ...]      # our (Flax) shape
    #: the logical name of each dimension ("vocab", "embed", "mlp", ...): ``sharding.RULES``
    #: maps the names to mesh axes (MaxText's logical_axis_rules), so a family's layout over
    #: the devices is a fact next to its key names, not a guess from the shape
    axes: tuple[str, ...]
    transpose: bool = False     # Dense kernel [in, out] <-> torch.nn.Linear weight [out, in]


@dataclasses.dataclass(frozen=True)
class WeightTable:
    """A family's Hugging Face ``*ForMaskedLM`` state dict, key by key.

    ``tied``: (key, source) pairs a checkpoint may carry as copies (the tied decoder); on
    input a copy must equal its source, on output it is not written.  ``ignored``: a regex of
    keys a checkpoint may carry that the MLM model does not use (buffers, poolers, other
    heads).  ``renames``: (regex, replacement) for legacy key names, applied on input.
    ``carried``: a regex of ignored keys that are kept as they are from the weights ``init
    --from`` imports into every export (BERT's pooler: the MLM objective never trains it,
    sequence classification starts from it); see ``hf_weights.carried_tensors``.
    """

    entries: tuple[WeightEntry, ...]
    tied: tuple[tuple[str, str], ...] = ()
    ignored: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    carried: str = ""

    def canonical(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key


def dense_entries(path: tuple[str, ...], hf: str, n_in: int, n_out: int, axes: tuple[str, str], *,
                  bias: bool = True) -> list[WeightEntry]:
    """A Dense layer: kernel [in, out] (transposed to torch's [out, in]) and its bias;
    ``axes`` the logical names of (in, out), e.g. ("embed", "mlp")."""
    out = [WeightEntry((*path, "kernel"), f"{hf}.weight", (n_in, n_out), tuple(axes), True)]
    if bias:
        out.append(WeightEntry((*path, "bias"), f"{hf}.bias", (n_out,), (axes[1],)))
    return out


def norm_entries(path: tuple[str, ...], hf: str, size: int, *, bias: bool = True) -> list[WeightEntry]:
    """A LayerNorm: Flax ``scale``/``bias`` = torch ``weight``/``bias`` (logical axis "norm")."""
    out = [WeightEntry((*path, "scale"), f"{hf}.weight", (size,), ("norm",))]
    if bias:
        out.append(WeightEntry((*path, "bias"), f"{hf}.bias", (size,), ("norm",)))
    return out


# --------------------------------------------------------------------------- config checks


def is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_positive_ints(config: dict, keys, *, default: Any = None) -> None:
    for key in keys:
        value = config.get(key, default)
        if not is_int(value) or value <= 0:
            raise ConfigError(f"config {key} must be a positive integer, got {value!r}",
                              f"fix it with --set {key}=N")


def require_numbers(config: dict, keys, *, positive: tuple[str, ...] = (), probability: tuple[str, ...] = ()) -> None:
    for key in keys:
        if key in config and not is_number(config[key]):
            raise ConfigError(f"config {key} must be a number, got {config[key]!r}", f"fix it with --set {key}=X")
    for key in positive:
        if key in config and not config[key] > 0:
            raise ConfigError(f"config {key} must be positive, got {config[key]!r}", f"fix it with --set {key}=X")
    for key in probability:
        if not 0.0 <= config.get(key, 0.0) < 1.0:
            raise ConfigError(f"config {key} must be in [0, 1)", f"fix it with --set {key}=0.1")


def refuse(config: dict, key: str, allowed, why: str) -> None:
    """Refuse a config feature the network does not implement, naming the field."""
    if key in config and config[key] not in allowed:
        raise ConfigError(f"config {key}={config[key]!r} is not supported ({why})",
                          f"set {key} to {allowed[0]!r}, or use transformers for this model")


# --------------------------------------------------------------------------- the parsed config


class FamilyConfig(abc.ABC):
    """What generic code reads of a family's parsed config (``Family.parse_config``): train,
    eval, predict, FLOPs, presets, the layer stack and the network base
    (``mlmtool.models.network``) use only these names.  A family's config is a frozen
    dataclass subclassing this one with Hugging Face ``config.json`` field names; the
    fields below are dataclass fields (or properties, where the family spells them otherwise).
    The properties map HF's usual names onto what generic code reads; a family whose
    fields mean something else (ALBERT's shared layers, DistilBERT's ``n_layers``, RoBERTa's
    position offset) overrides them.
    """

    model_type: str          # config.json's model_type
    vocab_size: int
    hidden_size: int         # width of the encoder's residual stream
    pad_token_id: int
    max_position_embeddings: int  # named in the error for a too long input
    num_hidden_layers: int   # HF's names, read by the default properties below
    num_attention_heads: int

    @property
    def num_layers(self) -> int:
        """Encoder layers (what remat/scan iterate over)."""
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        """Attention heads per layer."""
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Size of one head (the attention kernels' choice depends on it)."""
        return self.hidden_size // self.num_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input the network accepts (the position table's size)."""
        return self.max_position_embeddings

    @property
    def decoder_width(self) -> int:
        """Columns of the tied decoder (the word-embedding width; factorized embeddings: smaller)."""
        return self.hidden_size


def require_model_type(d, model_types) -> None:
    """The parse preamble: ``d`` is a JSON object whose model_type is one of ``model_types``."""
    if not isinstance(d, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
    if d.get("model_type") not in model_types:
        raise ConfigError(f"unsupported model_type {d.get('model_type')!r}",
                          hint=f"use one of {', '.join(model_types)}")


def config_fields(cls, d: dict, **overrides) -> dict:
    """The keyword arguments of the dataclass ``cls`` found in config.json ``d`` (unknown keys
    ignored; integer values of float fields made floats; ``overrides`` win); ConfigError
    naming a required field that is missing."""
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in overrides:
            value = overrides[field.name]
        elif field.name in d:
            value = d[field.name]
        elif field.default is dataclasses.MISSING:
            raise ConfigError(f"config is missing required field {field.name!r}")
        else:
            continue
        kwargs[field.name] = float(value) if field.type == "float" and is_int(value) else value
    return kwargs


# --------------------------------------------------------------------------- the family


class Family:
    """The facts only a family knows.  Subclasses set the attributes and implement
    ``parse_config``, ``weight_table``, ``parameter_count`` and ``summary``."""

    name: str = ""
    #: model_type -> the HF ``*ForMaskedLM`` architecture written into config.json
    model_types: dict[str, str] = {}
    #: preset name -> config.json fields (the published numbers); help text; old names
    presets: dict[str, dict] = {}
    preset_help: dict[str, str] = {}
    preset_aliases: dict[str, str] = {}
    #: model_type -> ``AutoConfig.for_model(model_type).to_dict()`` of transformers 5 (without
    #: transformers_version): written out so init needs neither transformers nor torch;
    #: tests/test_presets.py checks each against the installed transformers
    hf_defaults: dict[str, dict] = {}
    #: config.json keys of the family's own beside transformers' fields (ELECTRA's nested
    #: ``generator``): transformers keeps them as given, so presets need not ask it
    extra_config_keys: tuple[str, ...] = ()
    #: model_type -> how its tokenizer is trained
    tokenizer: dict[str, TokenizerDefaults] = {}
    #: "module:Class" of the Flax network, imported only when a model is built
    network: str = ""
    #: top-level parameter modules of the MLM head (for FLOPs: they run on masked slots only)
    head_modules: tuple[str, ...] = ()
    #: the config.json fields that fix the parameter shapes (a checkpoint of another shape is
    #: diagnosed by naming the fields that differ)
    architecture_keys: tuple[str, ...] = ()
    #: the config.json field of the number of layers (named in errors)
    layers_key: str = "num_hidden_layers"
    #: where parameter shapes show config.json sizes, for naming the fields a checkpoint of
    #: another shape differs in: (field, parameter path, axis); and the path whose children
    #: are the ``layers_key`` layers ("0", "1", ...)
    shape_fields: tuple[tuple[str, tuple[str, ...], int], ...] = ()
    layers_path: tuple[str, ...] = ()
    #: the network takes ``segment_ids`` [B, L] (documents packed in a row; 0 = padding):
    #: positions restart at each document and attention stays inside it (``train
    #: --document-attention``; the contract is in ``mlmtool.models.layers.attention``)
    document_attention: bool = False
    #: ``train``'s default for --document-attention: on where the published recipe trains
    #: that way (ModernBERT), off where it packs across documents (BERT, RoBERTa)
    document_attention_default: bool = False

    # -- to implement ------------------------------------------------------------------------

    def parse_config(self, hf: dict, /):
        """config.json dict -> the family's frozen config; ConfigError naming the field for a
        value out of range or a feature the network does not implement."""
        raise NotImplementedError

    def weight_table(self, config) -> WeightTable:
        raise NotImplementedError

    def parameter_count(self, hf: dict) -> int:
        """Parameters of the MLM model (tied decoder counted once), by arithmetic: no jax
        (tested equal to ``jax.eval_shape`` of the network)."""
        raise NotImplementedError

    def summary(self, hf: dict) -> dict:
        """The numbers init and info print: layers, hidden, heads, intermediate, vocab, max_positions."""
        raise NotImplementedError

    # -- with defaults -----------------------------------------------------------------------

    def validate(self, hf: dict) -> None:
        self.parse_config(hf)

    def derived_overrides(self, base: dict, fields: dict) -> dict:
        """``init --set`` fields plus those the family derives from them when they are not
        given, as transformers' config class does (ModernBERT's ``layer_types`` from
        ``num_hidden_layers``)."""
        return fields

    def max_sequence_length(self, hf: dict) -> int:
        return self.parse_config(hf).max_sequence_length

    def architecture(self, model_type: str) -> str:
        return self.model_types[model_type]

    def no_weight_decay(self, path: tuple[str, ...], shape: tuple[int, ...]) -> bool:
        """Parameters trained without weight decay: those with fewer than 2 dimensions
        (biases, norm scales), nanoGPT's rule; tests check it equals HF Trainer's
        ``get_decay_parameter_names`` for every family."""
        return len(shape) < 2

    def matmul_parameters(self, config) -> tuple[int, int]:
        """(encoder, MLM head) parameters that take part in per-token arithmetic: every
        parameter but the embedding lookup tables, plus the tied decoder (the word
        embeddings used as a matmul) in the head."""
        encoder = head = 0
        for e in self.weight_table(config).entries:
            n = math.prod(e.shape)
            if e.path[0] in self.head_modules:
                head += n
            elif e.path[-1] != "embedding":
                encoder += n
        return encoder, head + config.vocab_size * config.decoder_width

    def fields_from_shapes(self, shapes: dict[str, tuple]) -> dict[str, int]:
        """The config.json sizes that a parameter tree's shapes imply, ``shapes`` keyed by
        ``jax.tree_util.keystr`` paths; {} unless every path of ``shape_fields`` is there
        (the tree is not this family's)."""
        def key(path):
            return "".join(f"[{p!r}]" for p in path)

        out: dict[str, int] = {}
        for field, path, axis in self.shape_fields:
            shape = shapes.get(key(path))
            if shape is None or len(shape) <= axis:
                return {}
            out[field] = shape[axis]
        if self.layers_path:
            prefix = key(self.layers_path)
            out[self.layers_key] = len({k[len(prefix):].split("]")[0] for k in shapes if k.startswith(prefix)})
        return out

    def recipe_hint(self, model_type: str) -> str | None:
        """One line ``init`` prints after its summary: the options of prepare/train/eval that
        give the family's published pre-training recipe where they differ from the defaults
        (None: the defaults are the recipe)."""
        return None

    def tiny_test_configs(self) -> dict[str, dict]:
        """Small configs the parametrised tests run for this family (name -> config.json fields)."""
        return {}
