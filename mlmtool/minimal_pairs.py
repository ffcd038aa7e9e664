"""Minimal-pair accuracy: does the model prefer the grammatical sentence of each pair?

A minimal pair is two sentences that differ in one place, one acceptable
(``sentence_good``) and one not (``sentence_bad``), as in BLiMP (Warstadt et al. 2020)
and BabyLM's zero-shot evaluation.  A pair counts as right when the model gives the good
sentence a strictly higher log-probability than the bad one: a tie is wrong (a scorer that
gives every sentence the same score would otherwise look perfect).

Files are JSON lines, one pair per line, with ``sentence_good`` and ``sentence_bad``
(strings) and optionally BLiMP's ``UID``, ``field``, ``linguistics_term``, ``pair_id``.
A pair belongs to the set its ``UID`` names, else to its file's name (without extension).

Scoring is one seam, :class:`Scorer`: ``score(sentences) -> log-probabilities``.  A masked
LM scores with :class:`PLLScorer`, the pseudo-log-likelihood of Salazar et al. 2020
("Masked Language Model Scoring"): each token in turn is replaced by the mask token and
the log-probability the model gives the original token there is summed over the sentence.
``pll="word-l2r"`` (the default) is Kauf & Ivanova 2023's PLL-word-l2r: when a token is
scored, the tokens of the same word to its right are masked too, so a word split into
several pieces is not scored as if its later pieces gave the earlier ones away (the bias
that made the original PLL favour multi-token words).  ``pll="token"`` is the original.
Words are what :func:`mlmtool.data.tokenizer_facts.word_boundaries` says (the table whole-word
masking uses: a word is what whitespace separates, so with byte-level BPE a trailing
``.`` belongs to the word before it); special tokens are never scored.

Another objective plugs in another scorer.  PLL needs an MLM head, which an ELECTRA
discriminator (Clark et al. 2020) has not: it gives each token a logit ``d_i`` for "this
token was replaced".  :class:`DiscriminatorScorer` scores a sentence by the discriminator's
log-probability that every token is original, ``sum_i log sigmoid(-d_i)`` over its
non-special tokens, from one forward pass with nothing masked: the sentence-level form of
the zero-shot use of the discriminator in Xia et al. 2022 ("Prompting ELECTRA") and Ni &
Kao 2022 ("ELECTRA is a Zero-Shot Learner, Too"), who compare candidate words by the same
"original" probability.  :func:`scorer_for` picks it for a model with a discriminator
(``mlmtool init --preset electra-*``), PLL for every masked LM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mlmtool.constants import PLL_MODES, choice_error
from mlmtool.errors import DataError

BATCH_ROWS = 128  # masked copies scored per device call (a fixed shape: one compilation per length bucket)
BUCKET = 16       # rows are padded to a multiple of this many tokens


@dataclass(frozen=True)
class Pair:
    good: str
    bad: str
    set_name: str


class Scorer(Protocol):
    name: str  # what scored, for the results: "PLL word-l2r", "discriminator"

    def score(self, sentences: Sequence[str]) -> np.ndarray:
        """The log-probability of each sentence (float64 [N])."""


def read_pairs(paths: Sequence[str | Path]) -> list[Pair]:
    """Every pair of the JSON-lines files ``paths``; DataError naming the file and line of
    the first problem (a missing or empty file, a line that is not a JSON object with two
    non-empty strings)."""
    if not paths:
        raise DataError("no minimal-pair file given", "pass one or more JSON-lines files")
    pairs: list[Pair] = []
    hint = 'one JSON object per line: {"sentence_good": "...", "sentence_bad": "...", "UID": "set name"}'
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the minimal-pair file {path}: {getattr(e, 'strerror', None) or e}",
                            "pass an existing JSON-lines file (make one with scripts/make_minimal_pairs.py)") \
                from None
        count = 0
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not JSON ({e.msg})", hint) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n} is not a JSON object", hint)
            for key in ("sentence_good", "sentence_bad"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise DataError(f"{path}:{n} has no {key} (a non-empty string)", hint)
            uid = obj.get("UID")
            pairs.append(Pair(obj["sentence_good"], obj["sentence_bad"],
                              str(uid) if isinstance(uid, (str, int)) and str(uid) else path.stem))
            count += 1
        if not count:
            raise DataError(f"the minimal-pair file {path} holds no pair", hint)
    return pairs


def accuracy(pairs: Sequence[Pair], scorer: Scorer) -> dict:
    """Accuracy overall and per set (sorted by name): ties count as wrong."""
    scores = scorer.score([s for p in pairs for s in (p.good, p.bad)])
    good, bad = scores[0::2], scores[1::2]
    right = good > bad  # strictly: a tie is wrong
    sets: dict[str, list[bool]] = {}
    for pair, ok in zip(pairs, right):
        sets.setdefault(pair.set_name, []).append(bool(ok))
    return {"minimal_pairs_accuracy": float(np.mean(right)) if len(pairs) else 0.0,
            "minimal_pairs_count": len(pairs),
            "minimal_pairs_ties": int(np.sum(good == bad)),
            "minimal_pairs": {name: {"accuracy": float(np.mean(v)), "pairs": len(v)}
                              for name, v in sorted(sets.items())}}


# --------------------------------------------------------------------------- PLL


def word_ids(ids: Sequence[int], special: Sequence[bool], table: np.ndarray) -> list[int]:
    """The word number of each token (-1 for special tokens), from a word-boundary table
    (``STARTS_WORD`` / ``ENDS_WORD`` bits per id)."""
    from mlmtool.data.tokenizer_facts import ENDS_WORD, STARTS_WORD

    out, word, prev_ends = [], -1, True
    for tid, sp in zip(ids, special):
        if sp:
            out.append(-1)
            prev_ends = True
            continue
        flags = int(table[tid]) if 0 <= tid < len(table) else STARTS_WORD | ENDS_WORD
        if prev_ends or flags & STARTS_WORD:
            word += 1
        out.append(word)
        prev_ends = bool(flags & ENDS_WORD)
    return out


def masked_rows(ids: Sequence[int], special: Sequence[bool], words: Sequence[int] | None,
                mask_token_id: int) -> list[tuple[list[int], int]]:
    """One (masked copy, scored position) per non-special token: the token masked and, with
    ``words`` (PLL-word-l2r), the tokens of its word to its right masked too."""
    rows = []
    for t, sp in enumerate(special):
        if sp:
            continue
        row = list(ids)
        row[t] = mask_token_id
        if words is not None:
            for u in range(t + 1, len(ids)):
                if words[u] != words[t]:
                    break
                row[u] = mask_token_id
        rows.append((row, t))
    return rows


class _Tokenized:
    """What both scorers share: the tokenizer and the model's length."""

    tokenizer: object
    max_length: int

    def encode(self, sentence: str) -> tuple[list[int], list[bool]]:
        """Token ids (with the special tokens the tokenizer adds) and which are special;
        DataError when the sentence is longer than the model reads."""
        enc = self.tokenizer.encode(sentence)
        ids, special = list(enc.ids), [bool(s) for s in enc.special_tokens_mask]
        if len(ids) > self.max_length:
            short = sentence if len(sentence) <= 60 else sentence[:57] + "..."
            raise DataError(f"the sentence {short!r} is {len(ids):,} tokens long, but the model reads at most "
                            f"{self.max_length:,} (max_position_embeddings)", "shorten or drop that pair")
        return ids, special


def _check_finite(totals: np.ndarray) -> np.ndarray:
    if not np.isfinite(totals).all():
        from mlmtool.errors import CheckpointError

        raise CheckpointError("the model's log-probabilities are not finite (nan/inf): its weights hold inf or "
                              "nan", "score another checkpoint (--checkpoint STEP), or train again")
    return totals


class PLLScorer(_Tokenized):
    """Pseudo-log-likelihood of a Flax masked LM (``mlmtool.models`` module + params), every
    masked copy of every sentence scored in batches of ``batch_rows`` on the device."""

    def __init__(self, module, params, tokenizer, *, mask_token_id: int, pad_token_id: int, max_length: int,
                 word_table: np.ndarray | None = None, pll: str = "word-l2r", batch_rows: int = BATCH_ROWS):
        from mlmtool.errors import ConfigError

        if pll not in PLL_MODES:
            raise ConfigError(choice_error("--pll", pll, PLL_MODES), "use --pll word-l2r")
        if pll == "word-l2r" and word_table is None:
            raise ConfigError("PLL-word-l2r needs the tokenizer's word boundaries", "use --pll token")
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.mask_token_id, self.pad_token_id, self.max_length = mask_token_id, pad_token_id, max_length
        self.word_table, self.pll, self.batch_rows = word_table, pll, batch_rows
        self.name = f"PLL {pll}"
        self._fn = None

    def _score_fn(self):
        if self._fn is None:
            import jax
            import jax.numpy as jnp

            module = self.module

            def fn(params, ids, attention, positions, labels):
                logits = module.apply({"params": params}, ids, attention_mask=attention, deterministic=True,
                                      masked_positions=positions[:, None])[:, 0, :]  # [B, V]
                logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                return jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # [B]

            self._fn = jax.jit(fn)
        return self._fn

    def score(self, sentences: Sequence[str]) -> np.ndarray:
        rows: list[tuple[list[int], int, int, int]] = []  # (masked ids, position, label, sentence)
        for i, sentence in enumerate(sentences):
            ids, special = self.encode(sentence)
            words = word_ids(ids, special, self.word_table) if self.pll == "word-l2r" else None
            rows += [(row, t, ids[t], i) for row, t in masked_rows(ids, special, words, self.mask_token_id)]
        totals = np.zeros(len(sentences), dtype=np.float64)
        if not rows:
            return totals
        fn = self._score_fn()
        rows.sort(key=lambda r: len(r[0]))  # similar lengths share a padded shape
        for start in range(0, len(rows), self.batch_rows):
            chunk = rows[start:start + self.batch_rows]
            width = min(self.max_length, -(-max(len(r[0]) for r in chunk) // BUCKET) * BUCKET)
            ids = np.full((self.batch_rows, width), self.pad_token_id, dtype=np.int32)
            attention = np.zeros((self.batch_rows, width), dtype=np.int32)
            positions = np.zeros(self.batch_rows, dtype=np.int32)
            labels = np.zeros(self.batch_rows, dtype=np.int32)
            for j, (row, t, label, _) in enumerate(chunk):
                ids[j, :len(row)], attention[j, :len(row)], positions[j], labels[j] = row, 1, t, label
            attention[len(chunk):, 0] = 1  # filler rows: one visible token, their scores dropped
            out = np.asarray(fn(self.params, ids, attention, positions, labels), dtype=np.float64)
            for j, (_, _, _, i) in enumerate(chunk):
                totals[i] += out[j]
        return _check_finite(totals)


class DiscriminatorScorer(_Tokenized):
    """ELECTRA's discriminator (``mlmtool.models.electra_flax.Electra.discriminate``): the
    log-probability that every non-special token is original, ``sum_i log sigmoid(-d_i)``
    (module doc), ``batch_rows`` sentences per device call, each read once, unmasked."""

    name = "discriminator"

    def __init__(self, module, params, tokenizer, *, pad_token_id: int, max_length: int,
                 batch_rows: int = BATCH_ROWS):
        self.module, self.params, self.tokenizer = module, params, tokenizer
        self.pad_token_id, self.max_length, self.batch_rows = pad_token_id, max_length, batch_rows
        self._fn = None

    def _score_fn(self):
        if self._fn is None:
            import jax
            import jax.numpy as jnp

            module = self.module

            def fn(params, ids, attention, scored):
                d = module.apply({"params": params}, ids, attention_mask=attention, method="discriminate")  # [B, L]
                return jnp.sum(jax.nn.log_sigmoid(-d.astype(jnp.float32)) * scored, axis=-1)  # [B]

            self._fn = jax.jit(fn)
        return self._fn

    def score(self, sentences: Sequence[str]) -> np.ndarray:
        encoded = [self.encode(s) for s in sentences]
        order = sorted(range(len(sentences)), key=lambda i: len(encoded[i][0]))  # similar lengths share a shape
        totals = np.zeros(len(sentences), dtype=np.float64)
        fn = self._score_fn()
        for start in range(0, len(order), self.batch_rows):
            chunk = order[start:start + self.batch_rows]
            width = min(self.max_length, -(-max(len(encoded[i][0]) for i in chunk) // BUCKET) * BUCKET)
            ids = np.full((self.batch_rows, width), self.pad_token_id, dtype=np.int32)
            attention = np.zeros((self.batch_rows, width), dtype=np.int32)
            scored = np.zeros((self.batch_rows, width), dtype=np.float32)
            for j, i in enumerate(chunk):
                row, special = encoded[i]
                ids[j, :len(row)], attention[j, :len(row)] = row, 1
                scored[j, :len(row)] = [0.0 if sp else 1.0 for sp in special]
            attention[len(chunk):, 0] = 1  # filler rows: one visible token, their scores dropped
            out = np.asarray(fn(self.params, ids, attention, scored), dtype=np.float64)
            totals[chunk] = out[:len(chunk)]
        return _check_finite(totals)


def pll_scorer(mdir, loaded, params, *, pll: str = "word-l2r", batch_rows: int = BATCH_ROWS) -> PLLScorer:
    """The PLL scorer of DIR's model (``loaded``: ``mlmtool.models.LoadedModel``) with its
    tokenizer (``tokenizers`` alone) and, for word-l2r, its word boundaries."""
    from tokenizers import Tokenizer

    from mlmtool.data.stores import word_boundaries_for
    from mlmtool.data.tokenizer_facts import tokenizer_info

    info = tokenizer_info(mdir)
    table = word_boundaries_for(mdir, loaded.hf_config["vocab_size"]) if pll == "word-l2r" else None
    return PLLScorer(loaded.module, params, Tokenizer.from_file(info.path), mask_token_id=info.mask_token_id,
                     pad_token_id=info.pad_token_id, max_length=loaded.max_sequence_length, word_table=table,
                     pll=pll, batch_rows=batch_rows)


def scorer_for(mdir, loaded, params, *, pll: str = "word-l2r", batch_rows: int = BATCH_ROWS) -> Scorer:
    """DIR's scorer: the discriminator's (:class:`DiscriminatorScorer`) for a model that has
    one (an ELECTRA pair or discriminator; ``pll`` does not apply), else PLL."""
    if "discriminator" not in getattr(loaded.config, "towers", {}):
        return pll_scorer(mdir, loaded, params, pll=pll, batch_rows=batch_rows)
    from tokenizers import Tokenizer

    from mlmtool.data.tokenizer_facts import tokenizer_info

    info = tokenizer_info(mdir)
    return DiscriminatorScorer(loaded.module, params, Tokenizer.from_file(info.path), pad_token_id=info.pad_token_id,
                               max_length=loaded.max_sequence_length, batch_rows=batch_rows)


def check_lengths(pairs: Sequence[Pair], scorer: _Tokenized) -> None:
    """Every sentence fits the model (DataError naming the first that does not), before any work."""
    for p in pairs:
        scorer.encode(p.good)
        scorer.encode(p.bad)


class TrainingJudge:
    """``train --eval-minimal-pairs FILE``: the pairs read (and their lengths checked) at
    set-up, scored at every evaluation with the parameters of the moment."""

    def __init__(self, mdir, loaded, path: str, pll: str = "word-l2r"):
        import jax

        if jax.process_count() > 1:
            from mlmtool.errors import TrainingError

            raise TrainingError("--eval-minimal-pairs scores on one process: not yet with several",
                                "drop it and score the checkpoints with 'mlmtool eval DIR --minimal-pairs FILE'")
        self.pairs = read_pairs([path])
        self.scorer = scorer_for(mdir, loaded, None, pll=pll)
        check_lengths(self.pairs, self.scorer)

    def __call__(self, params) -> dict:
        self.scorer.params = params
        return accuracy(self.pairs, self.scorer)


def format_results(results: dict) -> list[str]:
    """Lines for the terminal: each set, then the overall accuracy."""
    lines = [f"  {name:<40} {s['accuracy']:.4f}  ({s['pairs']:,} pairs)"
             for name, s in results["minimal_pairs"].items()]
    lines.append(f"  {'overall':<40} {results['minimal_pairs_accuracy']:.4f}  "
                 f"({results['minimal_pairs_count']:,} pairs, {results['minimal_pairs_ties']:,} ties: wrong)")
    return lines


def run_minimal_pairs(mdir, files: Sequence[str], *, checkpoint: str = "latest", pll: str = "word-l2r",
                      dtype: str = "float32", batch_rows: int = BATCH_ROWS) -> dict:
    """``mlmtool eval DIR --minimal-pairs FILE...``: score the pairs with DIR's model, write
    eval_results.json, a metrics.jsonl record and TensorBoard scalars (process 0)."""
    import jax

    from mlmtool.training import checkpoint as ckpt
    from mlmtool.runtime import sharding as sh
    from mlmtool.atomic import atomic_write_json
    from mlmtool.models import load_model
    from mlmtool.runtime.progress import MetricsWriter

    if pll not in PLL_MODES:
        from mlmtool.errors import ConfigError

        raise ConfigError(choice_error("--pll", pll, PLL_MODES), "use --pll word-l2r")
    pairs = read_pairs(files)
    config = mdir.read_config()
    loaded = load_model(config, dtype=dtype)
    scorer = scorer_for(mdir, loaded, None, pll=pll, batch_rows=batch_rows)
    check_lengths(pairs, scorer)
    selected = ckpt.select_checkpoint(mdir, checkpoint)
    mesh = sh.make_mesh(None, devices=jax.devices()[:1])
    scorer.params, source = ckpt.load_params(mdir, loaded, "export" if selected is None else str(selected), mesh,
                                             sh.state_shardings(mesh, loaded.abstract_params, loaded.param_axes),
                                             config=config)
    results = {"checkpoint": source, "scorer": scorer.name,
               **({"pll": pll} if isinstance(scorer, PLLScorer) else {}), **accuracy(pairs, scorer),
               "minimal_pairs_files": [str(f) for f in files]}
    if sh.is_main_process():
        atomic_write_json(mdir.eval_results_path, results)
        step = ckpt.weights_step(mdir, selected)
        record = {"event": "eval", **results, **({} if step is None else {"step": step})}
        MetricsWriter(mdir.metrics_path, tensorboard_dir=mdir.tensorboard_dir).write(record)
    return results
