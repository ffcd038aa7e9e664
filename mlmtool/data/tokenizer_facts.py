"""What ``prepare`` needs to know about DIR's tokenizer, read with ``tokenizers`` alone.

:func:`tokenizer_info` gives the special token ids (pad, mask, unk, cls, sep, bos, eos,
and every special id, as transformers' ``all_special_ids``), the size and the sha256 of
``tokenizer.json``, without importing transformers (seconds of start-up, and ``prepare``
forks workers).  The names come from ``tokenizer_config.json``; when that file is missing
or names neither a mask nor a pad token, the conventional names of the tokenizer's kind
(:data:`_NAME_DEFAULTS`) are used, the kind told by whether ``<mask>`` is in the vocabulary.
:func:`word_boundaries` reads where words start from ``tokenizer.json`` (whole-word and span
masking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlmtool.errors import ConfigError, DataError
from mlmtool.modeldir import ModelDir, file_sha256
from mlmtool.models.base import BERT_SPECIALS, ROBERTA_SPECIALS


@dataclass(frozen=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    pad_token_id: int
    mask_token_id: int
    unk_token_id: int | None
    cls_token_id: int | None
    sep_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None
    special_token_ids: tuple[int, ...]


#: used when tokenizer_config.json is missing: the two conventions (mlmtool.models.base)
_NAME_DEFAULTS = {"<mask>": ROBERTA_SPECIALS.hf_kwargs(), "[MASK]": BERT_SPECIALS.hf_kwargs()}


def retrain_hint(model_dir: ModelDir, what: str = "it", note: str = "") -> str:
    """How to get a tokenizer that fits DIR again: retraining it, where that is allowed; on a
    DIR whose weights belong to the tokenizer ('init --from' or trained), 'mlmtool tokenizer'
    refuses without --force, so the hint says what works there."""
    source = model_dir.init_source() if model_dir.init_weights_path.exists() else None
    if source is not None:
        return (f"'mlmtool init {model_dir.path} --from {source} --force' copies the tokenizer and config.json "
                "of the imported model again")
    trained = model_dir.trained_state()
    if trained or model_dir.init_weights_path.exists():
        made = ", ".join(trained) or model_dir.init_weights_path.name
        return (f"put back the tokenizer files and config.json that {made} in {model_dir.path} were made with; "
                f"a new tokenizer makes them unusable ('mlmtool tokenizer {model_dir.path} FILE... --force', "
                "then prepare --force and train --no-resume --force)")
    return f"retrain {what} with 'mlmtool tokenizer {model_dir.path} FILE...'{note}"


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_info(model_dir: ModelDir) -> TokenizerInfo:
    """Special ids, size and hash of DIR's tokenizer (tokenizers only, no transformers)."""
    from tokenizers import Tokenizer

    path = model_dir.require_tokenizer()
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"cannot load {path} ({e})", retrain_hint(model_dir)) from None
    names: dict[str, Any] = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            names = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            names = {}
    if not any(_token_name(names.get(k)) for k in ("mask_token", "pad_token")):
        names = _NAME_DEFAULTS["<mask>" if tok.token_to_id("<mask>") is not None else "[MASK]"]

    def tid(key: str) -> int | None:
        name = _token_name(names.get(key))
        return tok.token_to_id(name) if name else None

    ids = {k: tid(k) for k in ("pad_token", "mask_token", "unk_token", "cls_token", "sep_token",
                               "bos_token", "eos_token")}
    for key in ("pad_token", "mask_token"):
        if ids[key] is None:
            raise DataError(f"the tokenizer in {model_dir} has no {key.replace('_', ' ')}", retrain_hint(model_dir))
    special = {i for i in ids.values() if i is not None}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = names.get(key)
        if isinstance(extra, list):
            special.update(i for i in (tok.token_to_id(_token_name(t) or "") for t in extra)
                           if i is not None)
    special.update(t.get("id") for t in json.loads(path.read_text(encoding="utf-8"))
                   .get("added_tokens", []) if t.get("special") and isinstance(t.get("id"), int))
    return TokenizerInfo(
        path=str(path), sha256=file_sha256(path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        pad_token_id=ids["pad_token"], mask_token_id=ids["mask_token"],
        unk_token_id=ids["unk_token"], cls_token_id=ids["cls_token"], sep_token_id=ids["sep_token"],
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"],
        special_token_ids=tuple(sorted(special)))


# --------------------------------------------------------------------------- word starts


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
    masking (``mlmtool.training.masking``).  A word is what the pre-tokenizer splits on whitespace:

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
