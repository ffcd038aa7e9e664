"""Tokenizing documents exactly as ``encode_batch`` does, 2-3x cheaper, by caching pieces.

:class:`PieceEncoder` is the subtlest code of ``prepare``: it relies on properties of the
tokenizer pipelines mlmtool trains (its docstring gives the argument), admits only those
(:meth:`PieceEncoder.supports`), and checks itself on tricky text at start-up, falling
back to plain ``encode_batch`` on any difference.  ``prepare --no-piece-cache`` turns it
off (same output, slower), as an escape hatch should a tokenizer slip through both.
"""

from __future__ import annotations

import re
from itertools import chain, repeat

import numpy as np


class PieceEncoder:
    r"""Encode documents exactly as ``tokenizer.encode_batch`` does (special tokens
    included), about twice as fast or more, by caching the encoding of space-separated pieces.

    A document is cut at every single space that lies between two non-whitespace
    characters ("the cat" → "the", " cat"; the space goes with the piece after it).  With
    the pipelines mlmtool trains, the tokens of the document are exactly the tokens of
    its pieces, one after the other, between the post-processor's prefix and suffix:

    * ByteLevel (no prefix space) splits with the GPT-2 pattern, none of whose matches
      crosses such a space except one starting at it (`` ?\p{L}+`` etc.); BPE works per
      pre-token.  BertPreTokenizer splits at whitespace anyway; WordPiece works per word.
    * Lowercase and BertNormalizer act per character (a space is a starter, so NFD and
      accent stripping do not cross it either).
    * added tokens hold no whitespace and never strip to the right; ``lstrip`` (RoBERTa's
      ``<mask>``) takes the space at the start of its piece as it would in the document.

    Python's ``\s`` covers every character the tokenizers' regex engine calls whitespace,
    so "between two non-whitespace characters" is decided conservatively.  Pieces repeat
    (Zipf), so most are looked up, not tokenized; the unique ones are encoded in one batch
    call.  :meth:`supports` admits only tokenizers of that shape, and a self-check on
    tricky text at start-up falls back to plain ``encode_batch`` on any difference.
    """

    _SPLIT = re.compile(r"(?<=\S)(?= \S)")
    _CHECK_TEXTS = (
        "Hello world, it's 3.14 -- ok?", " leading and trailing ", "double  space\tand tab",
        "<mask> The <mask>. A<mask>b <s> </s> [MASK] [CLS]", "naïve Émile ΟΔΟΣ straße 日本語 😀 x",
        "a \u00a0b\u3000c \u200bd \x1ce", "don't 've 're 'll 'd 's", "x" * 300 + " y",
        "  ", "tab\t", "mixed \t space", "a\u0301 \u0301b",
    )

    _PRE, _SUF = 0, 1   # piece ids of the post-processor's prefix and suffix

    def __init__(self, tok, max_entries: int = 400_000):
        self.tok = tok
        self.max_entries = max_entries
        self.prefix, self.suffix = self._frame(tok)
        self._reset()
        self.enabled = self.prefix is not None and self._self_check()

    def _reset(self) -> None:
        """Empty cache: piece strings → piece ids → token ids in one flat table."""
        self.first: dict[str, int] = {}    # piece at the start of a document
        self.spaced: dict[str, int] = {}   # piece after a space (key without the space)
        self._tokens = np.zeros(1 << 16, dtype=np.int64)  # token ids of all pieces, back to back
        self._start = np.zeros(1 << 12, dtype=np.int64)   # piece id → offset in _tokens
        self._len = np.zeros(1 << 12, dtype=np.int64)     # piece id → number of tokens
        self._pieces_n = self._tokens_n = 0
        if self.prefix is not None:
            self._add([self.prefix, self.suffix])  # ids 0 and 1

    @staticmethod
    def supports(tokenizer_json: dict) -> bool:
        """Whether the tokenizer's pipeline is one for which piece caching is exact."""
        norm = tokenizer_json.get("normalizer")
        if norm is not None and norm.get("type") not in ("Lowercase", "BertNormalizer"):
            return False
        pre = tokenizer_json.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel":
            if pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
                return False
        elif pre.get("type") != "BertPreTokenizer":
            return False
        model = tokenizer_json.get("model") or {}
        if model.get("type") not in ("BPE", "WordPiece") or model.get("dropout"):
            return False
        for t in tokenizer_json.get("added_tokens") or []:
            content = t.get("content", "")
            if (not content or any(c.isspace() for c in content) or t.get("rstrip")
                    or t.get("single_word")):
                return False
        return True

    @staticmethod
    def _frame(tok) -> tuple[list[int] | None, list[int] | None]:
        """The post-processor's tokens before and after a document's own."""
        frame = tok.encode("", add_special_tokens=True).ids
        full = tok.encode("a b", add_special_tokens=True).ids
        bare = tok.encode("a b", add_special_tokens=False).ids
        for k in range(len(frame) + 1):
            if full == frame[:k] + bare + frame[k:]:
                return frame[:k], frame[k:]
        return None, None

    def _self_check(self) -> bool:
        texts = list(self._CHECK_TEXTS)
        want = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]
        got = self.encode_lists(texts, check=False)
        self._reset()
        return got == want

    def _add(self, id_lists: list[list[int]]) -> list[int]:
        """Append pieces' token ids to the table; their new piece ids."""
        lens = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        n_tok = int(lens.sum())
        first_id, first_tok = self._pieces_n, self._tokens_n
        if first_tok + n_tok > self._tokens.size:
            self._tokens = np.resize(self._tokens, max(2 * self._tokens.size, first_tok + n_tok))
        if first_id + len(id_lists) > self._start.size:
            size = max(2 * self._start.size, first_id + len(id_lists))
            self._start, self._len = np.resize(self._start, size), np.resize(self._len, size)
        self._tokens[first_tok:first_tok + n_tok] = np.fromiter(
            chain.from_iterable(id_lists), dtype=np.int64, count=n_tok)
        ends = np.cumsum(lens)
        self._start[first_id:first_id + len(id_lists)] = first_tok + ends - lens
        self._len[first_id:first_id + len(id_lists)] = lens
        self._pieces_n += len(id_lists)
        self._tokens_n += n_tok
        return list(range(first_id, first_id + len(id_lists)))

    def _pieces(self, docs: list[str]) -> tuple[list[str], list[list[str]]]:
        firsts, rests = [], []
        split = self._SPLIT.split
        for doc in docs:
            if doc.isprintable() and "  " not in doc and doc[:1] != " " and doc[-1:] != " ":
                parts = doc.split(" ")          # every space is single, between non-spaces
                firsts.append(parts[0])
                rests.append(parts[1:])
            else:
                parts = split(doc)
                firsts.append(parts[0])
                rests.append([p[1:] for p in parts[1:]])
        return firsts, rests

    def _lookup(self, cache: dict[str, int], keys: list[str], prefix: str) -> np.ndarray:
        """Piece ids of ``keys``, encoding (with ``prefix``) and adding the ones not cached."""
        ids = np.fromiter(map(cache.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        miss = np.flatnonzero(ids < 0)
        if miss.size:
            new = list(dict.fromkeys([keys[i] for i in miss]))
            encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
            encs = encode([prefix + k for k in new] if prefix else new, add_special_tokens=False)
            cache.update(zip(new, self._add([e.ids for e in encs])))
            ids[miss] = [cache[keys[i]] for i in miss]
        return ids

    def _encode(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all token ids, special tokens included, concatenated; tokens per document)."""
        if len(self.first) + len(self.spaced) > self.max_entries:
            self._reset()  # bounded memory: start over (rare; costs re-encoding)
        firsts, rests = self._pieces(docs)
        flat_rest = list(chain.from_iterable(rests))
        first_ids = self._lookup(self.first, firsts, "")
        rest_ids = self._lookup(self.spaced, flat_rest, " ")
        # per document: prefix, first piece, the other pieces, suffix
        per_doc = np.fromiter(map(len, rests), dtype=np.int64, count=len(rests)) + 3
        ends = np.cumsum(per_doc)
        starts = ends - per_doc
        seq = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
        fixed = np.zeros(seq.size, dtype=bool)
        fixed[starts] = fixed[starts + 1] = fixed[ends - 1] = True
        seq[starts] = self._PRE
        seq[starts + 1] = first_ids
        seq[ends - 1] = self._SUF
        seq[~fixed] = rest_ids
        # gather the pieces' tokens from the table
        lens = self._len[seq]
        out_start = np.cumsum(lens) - lens
        index = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(self._start[seq] - out_start, lens)
        tokens = self._tokens[index]
        per_doc_tokens = np.add.reduceat(lens, starts) if len(starts) else np.zeros(0, np.int64)
        return tokens, per_doc_tokens

    def _direct(self, docs: list[str]) -> list[list[int]]:
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in encode(docs, add_special_tokens=True)]

    def encode_lists(self, docs: list[str], check: bool = True) -> list[list[int]]:
        """Token ids of each document, special tokens included."""
        if check and not self.enabled:
            return self._direct(docs)
        if not docs:
            return []
        tokens, counts = self._encode(docs)
        return [a.tolist() for a in np.split(tokens, np.cumsum(counts)[:-1])]

    def encode_stream(self, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(the documents' token ids, special tokens included, concatenated; int64 tokens of
        each document): where each document starts in the stream, which ``prepare`` records
        beside the blocks."""
        if not docs:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
        if not self.enabled:
            ids = self._direct(docs)
            return _concat(ids, dtype), np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens, counts = self._encode(docs)
        return tokens.astype(dtype), np.asarray(counts, dtype=np.int64)


def _concat(ids: list[list[int]], dtype: np.dtype) -> np.ndarray:
    if not ids:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.array(x, dtype=dtype) for x in ids])
