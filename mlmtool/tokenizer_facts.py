"""What ``prepare`` needs to know about DIR's tokenizer, read with ``tokenizers`` alone.

:func:`tokenizer_info` gives the special token ids (pad, mask, unk, cls, sep, bos, eos,
and every special id, as transformers' ``all_special_ids``), the size and the sha256 of
``tokenizer.json``, without importing transformers (seconds of start-up, and ``prepare``
forks workers).  The names come from ``tokenizer_config.json``; when that file is missing
or names neither a mask nor a pad token, the conventional names of the tokenizer's kind
(:data:`_NAME_DEFAULTS`) are used, the kind told by whether ``<mask>`` is in the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlmtool.models.base import BERT_SPECIALS, ROBERTA_SPECIALS

from mlmtool.errors import DataError
from mlmtool.modeldir import ModelDir


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


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_info(model_dir: ModelDir) -> TokenizerInfo:
    """Special ids, size and hash of DIR's tokenizer (tokenizers only, no transformers)."""
    from tokenizers import Tokenizer

    from mlmtool.tokenizer_train import file_sha256

    path = model_dir.require_tokenizer()
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"cannot load {path} ({e})",
                        f"retrain it with 'mlmtool tokenizer {model_dir} FILE...'") from None
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
            raise DataError(f"the tokenizer in {model_dir} has no {key.replace('_', ' ')}",
                            f"retrain it with 'mlmtool tokenizer {model_dir} FILE...'")
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
