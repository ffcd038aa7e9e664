#!/usr/bin/env python
"""Make minimal pairs (BLiMP's JSON-lines format) from the real sentences of a corpus.

    python scripts/make_minimal_pairs.py CORPUS... -o pairs.jsonl [--per-set 200] [--skip-documents N]

CORPUS: text files, one document per line (``.txt``, or ``.xz`` / ``.gz`` compressed).  Each
document is split into sentences (after ``.``, ``!`` or ``?``, a space and a capital, but not
after Mr. Mrs. Ms. Dr. St.); a
sentence of 5 to 30 words, all in plain ASCII, is a candidate.  Each perturbation below
turns a candidate into an ungrammatical twin, at the first place it applies; the original is
``sentence_good``, the twin ``sentence_bad``, and the perturbation's name is the pair's
``UID`` (its set).  Nothing is random: the same corpus and options give the same file, byte
for byte (the adjacent swap's place is taken from a SHA-256 of the sentence).

Perturbations (a pronoun subject makes the agreement pairs unambiguous):

* ``agreement_is_are``: ``he/she/it is`` -> ``are``; ``we/they/you are`` -> ``is``;
* ``agreement_was_were``: ``he/she/it/I was`` -> ``were``; ``we/they/you were`` -> ``was``;
* ``agreement_has_have``: ``he/she/it has`` -> ``have``; ``I/we/they/you have`` -> ``has``;
* ``determiner_this_these``: ``this``/``these`` before a lower-case word -> ``these``/``this``;
* ``determiner_a_an``: ``a`` before a word starting with b, c, d, f, g, j, k, l, m, n, p, q,
  r, s, t, v, w, x, z -> ``an``; ``an`` before a word starting with a, e, i, o -> ``a``;
* ``swap_adjacent``: two adjacent lower-case words (different, at a place chosen by the
  sentence's hash, not the first word) swapped.

**Each set is balanced between its two directions** (``change``: the word replaced and its
replacement, e.g. ``is->are`` and ``are->is``): it holds as many pairs of one direction as of
the other, the first ``--per-set``/2 of each in corpus order (after ``--skip-documents``
documents: use it to draw pairs from text a model was not trained on), so a set is smaller
than ``--per-set`` when one direction is rarer in the corpus.  Without this a set measured
word frequency: real text says ``is`` far more often than ``are``, and a scorer that only
prefers the more frequent word (a unigram model, a random network's bias) scored the share of
``is->are`` pairs.  Balanced, such a scorer is right on one direction and wrong on the other:
0.5 on every agreement and determiner set.  ``swap_adjacent`` keeps the same words in both
sentences (a frequency-only scorer ties, which counts as wrong) and takes the first
``--per-set``.  A sentence gives at most one pair per set, and a sentence seen before gives
none.  The file states where each pair comes from (``source``: file and line).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"^[a-z]+$")
MIN_WORDS, MAX_WORDS = 5, 30

SINGULAR3 = {"he", "she", "it"}
PLURAL = {"we", "they", "you"}
#: (set name, {subject: {verb: replacement}}, what it tests)
AGREEMENT = (
    ("agreement_is_are", {**{s: {"is": "are"} for s in SINGULAR3}, **{p: {"are": "is"} for p in PLURAL}},
     "subject-verb agreement: is/are after a pronoun subject"),
    ("agreement_was_were", {**{s: {"was": "were"} for s in SINGULAR3 | {"i"}},
                            **{p: {"were": "was"} for p in PLURAL}},
     "subject-verb agreement: was/were after a pronoun subject"),
    ("agreement_has_have", {**{s: {"has": "have"} for s in SINGULAR3},
                            **{p: {"have": "has"} for p in PLURAL | {"i"}}},
     "subject-verb agreement: has/have after a pronoun subject"),
)
TERMS = {name: term for name, _, term in AGREEMENT}
TERMS.update(determiner_this_these="determiner-noun number: this/these",
             determiner_a_an="indefinite article form: a/an before consonant/vowel",
             swap_adjacent="word order: two adjacent words swapped")
SETS = tuple(TERMS)


def _case_like(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def agreement(words: list[str], table: dict) -> list[str] | None:
    for i in range(len(words) - 1):
        verbs = table.get(words[i].lower())
        if verbs and words[i + 1] in verbs:
            return words[:i + 1] + [verbs[words[i + 1]]] + words[i + 2:]
    return None


def this_these(words: list[str]) -> list[str] | None:
    for i in range(len(words) - 1):
        w = words[i].lower()
        if w in ("this", "these") and WORD.match(words[i + 1]):
            return words[:i] + [_case_like("these" if w == "this" else "this", words[i])] + words[i + 1:]
    return None


def a_an(words: list[str]) -> list[str] | None:
    for i in range(len(words) - 1):
        w, nxt = words[i].lower(), words[i + 1]
        if not WORD.match(nxt):
            continue
        if w == "a" and nxt[0] in "bcdfgjklmnpqrstvwxz":
            return words[:i] + [_case_like("an", words[i])] + words[i + 1:]
        if w == "an" and nxt[0] in "aeio":
            return words[:i] + [_case_like("a", words[i])] + words[i + 1:]
    return None


def swap_adjacent(words: list[str], sentence: str) -> list[str] | None:
    places = [i for i in range(1, len(words) - 1)
              if WORD.match(words[i]) and WORD.match(words[i + 1]) and words[i] != words[i + 1]]
    if not places:
        return None
    i = places[int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big") % len(places)]
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def perturb(name: str, words: list[str], sentence: str) -> list[str] | None:
    if name == "determiner_this_these":
        return this_these(words)
    if name == "determiner_a_an":
        return a_an(words)
    if name == "swap_adjacent":
        return swap_adjacent(words, sentence)
    return agreement(words, next(table for n, table, _ in AGREEMENT if n == name))


def documents(path: Path):
    opener = lzma.open if path.suffix == ".xz" else gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def sentences(paths: list[Path], skip_documents: int = 0):
    """(sentence, source) of every candidate sentence, in corpus order."""
    n = 0
    for path in paths:
        for line_no, doc in enumerate(documents(path), 1):
            n += 1
            if n <= skip_documents:
                continue
            for s in SENTENCE_END.split(doc.strip()):
                if s.isascii() and MIN_WORDS <= len(s.split()) <= MAX_WORDS and '"' not in s:
                    yield s, f"{path.name}:{line_no}"


def change(good: list[str], bad: list[str]) -> str | None:
    """The pair's direction, ``good->bad`` for the one word replaced (lower case); None for a swap."""
    diff = [(g.lower(), b.lower()) for g, b in zip(good, bad) if g != b]
    return f"{diff[0][0]}->{diff[0][1]}" if len(diff) == 1 else None


def make_pairs(paths: list[Path], per_set: int = 200, skip_documents: int = 0) -> list[dict]:
    """Per perturbation, up to ``per_set`` pairs, balanced between its two directions
    (``per_set // 2`` of each; the adjacent swap: ``per_set``), in set order then corpus order."""
    # (set, direction) -> pairs in corpus order; a direction is full at its quota
    found: dict[tuple[str, str | None], list[tuple[int, dict]]] = {}
    quota = {name: per_set if name == "swap_adjacent" else per_set // 2 for name in SETS}
    directions = {name: 1 if name == "swap_adjacent" else 2 for name in SETS}

    def full(name: str) -> bool:
        got = [v for (n, _), v in found.items() if n == name]
        return len(got) == directions[name] and all(len(v) >= quota[name] for v in got)

    seen: set[str] = set()
    for order, (sentence, source) in enumerate(sentences(paths, skip_documents)):
        if all(full(name) for name in SETS):
            break
        if sentence in seen:  # a repeated sentence would count twice
            continue
        seen.add(sentence)
        words = sentence.split()
        for name in SETS:
            bad = perturb(name, words, sentence)
            if bad is None or bad == words:
                continue
            direction = change(words, bad) if name != "swap_adjacent" else None
            got = found.setdefault((name, direction), [])
            if len(got) < quota[name]:
                pair = {"sentence_good": sentence, "sentence_bad": " ".join(bad), "UID": name, "field": "mlmtool",
                        "linguistics_term": TERMS[name], "source": source}
                if direction is not None:
                    pair["change"] = direction
                got.append((order, pair))
    out = []
    for name in SETS:
        groups = [v for (n, _), v in sorted(found.items(), key=lambda kv: str(kv[0][1])) if n == name]
        if name != "swap_adjacent":  # as many of each direction: the rarer one sets the size
            n = min(len(v) for v in groups) if len(groups) == 2 else 0
            groups = [v[:n] for v in groups]
        chosen = sorted((item for v in groups for item in v), key=lambda item: item[0])
        out.extend({**pair, "pair_id": i} for i, (_, pair) in enumerate(chosen))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="+", type=Path, help="text files, one document per line (.txt/.xz/.gz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the JSON-lines file to write")
    parser.add_argument("--per-set", type=int, default=200,
                        help="pairs per perturbation, half each direction (default 200)")
    parser.add_argument("--skip-documents", type=int, default=0,
                        help="skip the corpus's first N documents (e.g. the ones a model trained on)")
    args = parser.parse_args(argv)
    if args.per_set < 2:
        parser.error("--per-set must be at least 2 (one pair each direction)")
    for path in args.corpus:
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 1
    try:
        pairs = make_pairs(args.corpus, args.per_set, args.skip_documents)
    except (OSError, UnicodeDecodeError, EOFError, lzma.LZMAError) as e:
        print(f"error: cannot read the corpus ({e})", file=sys.stderr)
        return 1
    if not pairs:
        print("error: no sentence of the corpus fits any perturbation", file=sys.stderr)
        return 1
    args.output.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    counts = {name: sum(p["UID"] == name for p in pairs) for name in SETS}
    print(f"Wrote {len(pairs):,} pairs to {args.output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
