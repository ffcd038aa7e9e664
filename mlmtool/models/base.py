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

import dataclasses
import math
import re
from typing import Any, NamedTuple

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


#: Bits of :func:`word_boundaries`' table: the token starts a word; the token after it starts one.
STARTS_WORD, ENDS_WORD = 1, 2


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (``bytes_to_unicode``), as ByteLevel uses it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _find_component(node, kind: str) -> dict | None:
    """The first ``{"type": kind, ...}`` in a tokenizer.json component (Sequences walked)."""
    if isinstance(node, dict):
        if node.get("type") == kind:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = _find_component(item, kind)
            if found is not None:
                return found
    return None


def word_boundaries(tokenizer: dict, vocab_size: int):
    """Where words start, per token id, from a ``tokenizer.json`` (the parsed dict): a uint8
    numpy array [vocab_size] of ``STARTS_WORD`` / ``ENDS_WORD`` bits, for whole-word and span
    masking (``mlmtool.masking``).  A word is what the pre-tokenizer splits on whitespace:

    * byte-level BPE (RoBERTa): a piece that begins with an encoded whitespace byte (``Ġ``
      for a space, ``Ċ`` for a newline, ...) starts a word; a piece of whitespace only with
      a newline, tab, ... in it also ends one (ByteLevel's pre-tokenizer lets only a space
      lead a word, so the piece after ``Ċ`` has no ``Ġ``);
    * WordPiece (BERT): every piece without the ``##`` continuing prefix (punctuation is a
      word of its own, as in BERT's whole word masking);
    * Metaspace (Unigram / SentencePiece, XLM-R): a piece that begins with ``▁``;
    * BPE with an end-of-word suffix (``</w>``): the piece after one starts a word.

    Special and added tokens are words of their own (both bits).  Ids past the vocabulary
    (config.json's vocab_size may be larger) never occur and get both bits too.  The caller
    also starts a word at the beginning of each row.  Text with no spaces between words
    (Chinese, Japanese) is one "word" per whitespace-delimited run: use token masking there.
    Raises ConfigError when the tokenizer gives no way to tell.
    """
    import numpy as np

    model = tokenizer.get("model") or {}
    kind = model.get("type")
    vocab = model.get("vocab")
    if kind == "Unigram" and isinstance(vocab, list):
        pieces = {piece: i for i, (piece, *_rest) in enumerate(vocab)}
    elif isinstance(vocab, dict):
        pieces = vocab
    else:
        raise ConfigError(f"tokenizer.json has a {kind or 'missing'} model with no vocabulary to read word starts from",
                          "use --masking token")
    flags = np.full(max(vocab_size, 1), STARTS_WORD | ENDS_WORD, dtype=np.uint8)
    pre = tokenizer.get("pre_tokenizer")
    byte_level, metaspace = _find_component(pre, "ByteLevel"), _find_component(pre, "Metaspace")
    prefix, suffix = model.get("continuing_subword_prefix"), model.get("end_of_word_suffix")
    if kind == "WordPiece" or prefix:
        prefix = prefix or "##"

        def bits(piece):
            return 0 if piece.startswith(prefix) else STARTS_WORD
    elif suffix:
        def bits(piece):
            return ENDS_WORD if piece.endswith(suffix) else 0
    elif metaspace is not None:
        marker = metaspace.get("replacement", "▁")

        def bits(piece):
            return STARTS_WORD if piece.startswith(marker) else 0
    elif byte_level is not None:
        chars = _byte_level_chars()
        spaces, space = {chars[b] for b in b" \t\n\r\x0b\x0c"}, chars[ord(" ")]

        def bits(piece):
            if piece and all(c in spaces for c in piece) and set(piece) != {space}:
                return STARTS_WORD | ENDS_WORD
            return STARTS_WORD if piece[:1] in spaces else 0
    else:
        raise ConfigError(f"cannot tell from tokenizer.json where words start (a {kind} model without a "
                          "ByteLevel or Metaspace pre-tokenizer or a ## prefix)", "use --masking token")
    for piece, i in pieces.items():
        if 0 <= i < len(flags):
            flags[i] = bits(piece)
    for added in tokenizer.get("added_tokens") or ():
        if 0 <= added.get("id", -1) < len(flags):
            flags[added["id"]] = STARTS_WORD | ENDS_WORD
    return flags


# --------------------------------------------------------------------------- weights


class WeightEntry(NamedTuple):
    path: tuple[str, ...]       # key path in our params tree
    hf_key: str                 # transformers state_dict key
    shape: tuple[int, ...]      # our (Flax) shape
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


def dense_entries(path: tuple[str, ...], hf: str, n_in: int, n_out: int, *, bias: bool = True) -> list[WeightEntry]:
    """A Dense layer: kernel [in, out] (transposed to torch's [out, in]) and its bias."""
    out = [WeightEntry((*path, "kernel"), f"{hf}.weight", (n_in, n_out), True)]
    if bias:
        out.append(WeightEntry((*path, "bias"), f"{hf}.bias", (n_out,)))
    return out


def norm_entries(path: tuple[str, ...], hf: str, size: int, *, bias: bool = True) -> list[WeightEntry]:
    """A LayerNorm: Flax ``scale``/``bias`` = torch ``weight``/``bias``."""
    out = [WeightEntry((*path, "scale"), f"{hf}.weight", (size,))]
    if bias:
        out.append(WeightEntry((*path, "bias"), f"{hf}.bias", (size,)))
    return out


# --------------------------------------------------------------------------- config checks


def is_int(value) -> bool:
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


def require_choice(config: dict, key: str, choices, default: Any) -> None:
    value = config.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"config {key} {value!r} is not supported", f"use one of: {', '.join(choices)}")


def refuse(config: dict, key: str, allowed, why: str) -> None:
    """Refuse a config feature the network does not implement, naming the field."""
    if key in config and config[key] not in allowed:
        raise ConfigError(f"config {key}={config[key]!r} is not supported ({why})",
                          f"set {key} to {allowed[0]!r}, or use transformers for this model")


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
    #: tests/test_families.py checks each against the installed transformers
    hf_defaults: dict[str, dict] = {}
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
    #: the network takes ``segment_ids`` [B, L] (documents packed in a row; 0 = padding):
    #: positions restart at each document and attention stays inside it (``train
    #: --document-attention``; the contract is in ``mlmtool.models.layers.attention``)
    document_attention: bool = False
    #: ``train``'s default for --document-attention: on where the published recipe trains
    #: that way (ModernBERT), off where it packs across documents (BERT, RoBERTa)
    document_attention_default: bool = False

    # -- to implement ------------------------------------------------------------------------

    def parse_config(self, hf: dict):
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
        return encoder, head + config.vocab_size * config.hidden_size

    def recipe_hint(self, model_type: str) -> str | None:
        """One line ``init`` prints after its summary: the options of prepare/train/eval that
        give the family's published pre-training recipe where they differ from the defaults
        (None: the defaults are the recipe)."""
        return None

    def tiny_test_configs(self) -> dict[str, dict]:
        """Small configs the parametrised tests run for this family (name -> config.json fields)."""
        return {}
