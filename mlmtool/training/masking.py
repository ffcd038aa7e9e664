"""BERT's masked-language-model corruption, on the device, inside the jitted step.

Devlin et al. 2018 (arXiv:1810.04805, section 3.1): choose 15% of the tokens; of those,
replace 80% with ``<mask>``, 10% with a random token, keep 10% unchanged; predict the
original token at every chosen position.  As in Hugging Face's
``DataCollatorForLanguageModeling`` each non-special token is chosen independently with
probability ``mlm_probability``, special tokens (``<s> </s> <pad> <unk> <mask>``) never,
and the random replacement is drawn uniformly from the whole vocabulary.

The step computes the MLM head only at the chosen positions (MosaicBERT, Portes et al.
2023, arXiv:2312.17482): for small models the vocabulary projection is a third or more
of the FLOPs.  Shapes must be static under ``jit``, so a fixed number of position slots
is returned, with weight 0 for unused slots.  Training shares the slots among a group of
rows (a device's whole micro-batch): the masked count of 32 x 128 tokens has a standard
deviation of 3.7% of its mean where one row's has 21%, so a margin of five standard
deviations costs 736 slots per 4,096 tokens instead of 32 x 40 = 1,280, and the head
(vocabulary projection and loss) shrinks by 42%.  A chosen token beyond the slots is
dropped (left un-corrupted and unpredicted): for 32 x 128 tokens that happens to one
group in ten million (Binomial tail 9e-8), against one row in a million with 40 slots
per row.

``masking`` chooses what is masked together (the 80/10/10 replacement and the rest are the
same in every mode; specials and padding are never chosen):

* ``"token"``: each token independently, as above.
* ``"whole-word"``: each word independently with probability ``mlm_probability``, all its
  tokens together, as HF's ``DataCollatorForLanguageModeling(whole_word_mask=True)`` does
  (its probability is set on a word's first token): every token is chosen with probability
  ``mlm_probability``, so the rate counts tokens, and a word is never partly masked.  Word
  starts come from the tokenizer (``mlmtool.data.tokenizer_facts.word_boundaries``: a vocabulary-sized
  table on the device); each row starts a word, and so does every special token and the
  token after one.
* ``"span"`` (SpanBERT, Joshi et al. 2019, arXiv:1907.10529): runs of whole words whose
  lengths follow SpanBERT's law (geometric, p = 0.2, truncated to 1..10 words: mean 3.8).
  Static shapes rule out SpanBERT's loop ("draw a span, repeat until 15% is spent"), so
  each row draws an alternating sequence of unmasked gaps (geometric, at least one word,
  with mean ``3.8 (1 - rate) / rate``) and spans, started in its stationary state: every
  word is masked with probability exactly ``rate`` (the rate counts tokens, in expectation,
  as in the other modes), spans never touch each other (so each observed run of masked words
  is one drawn span), and a row's masks do not depend on its neighbours.  Rates above
  3.8 / 4.8 = 0.79 would need gaps shorter than a word: refused.

Whole words and spans make the masked count vary more than Binomial: the slots are sized
from the variance measured on the data (:func:`row_count_variance`), and a word that does
not fit in the slots is dropped whole.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.constants import MASKING_MODES as MODES
from mlmtool.data.tokenizer_facts import ENDS_WORD, STARTS_WORD

# SpanBERT's span lengths, in words: geometric with p = 0.2, truncated to 1..10 (mean 3.80).
SPAN_P, SPAN_MAX = 0.2, 10
_SPAN_PMF = SPAN_P * (1 - SPAN_P) ** np.arange(SPAN_MAX)
_SPAN_PMF /= _SPAN_PMF.sum()
SPAN_MEAN = float(np.sum(np.arange(1, SPAN_MAX + 1) * _SPAN_PMF))
_SPAN_CDF = np.cumsum(_SPAN_PMF)[:-1].astype(np.float32)  # P(length <= j), j = 1..9
# A row that starts inside a span (in the stationary process) has this much of it left:
# P(residual = j) proportional to P(length >= j) (the length-biased residual).
_SURVIVAL = np.cumsum(_SPAN_PMF[::-1])[::-1]
_RESIDUAL_CDF = np.cumsum(_SURVIVAL / _SURVIVAL.sum())[:-1].astype(np.float32)
#: The highest span-masking rate: gaps of one word between spans.
MAX_SPAN_RATE = SPAN_MEAN / (SPAN_MEAN + 1.0)


class MaskedBatch(NamedTuple):
    input_ids: jax.Array         # int32 [B, L]  the corrupted input
    masked_positions: jax.Array  # int32 [G, P]  chosen positions, ascending, then padding slots
    masked_labels: jax.Array     # int32 [G, P]  original token at each chosen position
    masked_weights: jax.Array    # float32 [G, P] 1 for a chosen position, 0 for an unused slot
    # G = B / rows_per_group; a group's positions index its rows laid end to end, [0, B / G * L).


def default_max_predictions(seq_len: int, mlm_probability: float, rows: int = 1,
                            row_variance: float | None = None) -> int:
    """Slots for a group of ``rows`` rows: mean + 5 sd of the masked count, rounded up to a
    multiple of 8 (and at most rows x seq_len).  The count is Binomial(rows x seq_len, p)
    for token masking; whole words and spans pass the variance of one row's count
    (``row_variance``, measured by :func:`row_count_variance`; rows are masked independently)."""
    n = rows * seq_len
    mean = n * mlm_probability
    binomial = seq_len * mlm_probability * (1.0 - mlm_probability)
    sd = math.sqrt(rows * (binomial if row_variance is None else max(row_variance, binomial)))
    slots = int(math.ceil((mean + 5.0 * sd) / 8.0) * 8)
    return max(1, min(n, slots))


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    *,
    special_token_ids: tuple[int, ...],
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float | jax.Array = 0.15,
    max_predictions: int | None = None,
    rows_per_group: int = 1,
    masking: str = "token",
    word_boundaries: np.ndarray | jax.Array | None = None,
) -> MaskedBatch:
    """Corrupt ``input_ids`` [B, L] and return the prediction targets (see module doc).

    Each group of ``rows_per_group`` consecutive rows (which must divide B) shares
    ``max_predictions`` slots.  ``max_predictions=None`` keeps one slot per position
    (P = rows_per_group x L, nothing ever dropped), which is what evaluation uses.
    ``mlm_probability`` may be a traced scalar (a rate that changes over training).
    ``vocab_size`` bounds the random replacement tokens: the tokenizer's size (the block
    store's ``vocab_size``), not config.json's, which may be larger (a padded embedding
    matrix, whose ids past the tokenizer never occur and must not be drawn).
    ``masking`` is a MODES name; whole-word and span masking need ``word_boundaries``
    (the uint8 [V] table of ``mlmtool.data.tokenizer_facts.word_boundaries``).
    """
    batch, seq_len = input_ids.shape
    if batch % rows_per_group:
        raise ValueError(f"rows_per_group={rows_per_group} does not divide the batch of {batch} rows")
    if masking not in MODES:
        raise ValueError(f"masking must be one of {', '.join(MODES)}, got {masking!r}")
    if masking != "token" and word_boundaries is None:
        raise ValueError(f"{masking} masking needs the tokenizer's word_boundaries table")
    groups, group_len = batch // rows_per_group, rows_per_group * seq_len
    num_slots = group_len if max_predictions is None else min(max_predictions, group_len)
    k_choose, k_action, k_random = jax.random.split(rng, 3)

    special = jnp.isin(input_ids, jnp.asarray(special_token_ids, dtype=input_ids.dtype))  # [B, L]
    if masking == "token":
        chosen = (jax.random.uniform(k_choose, (batch, seq_len)) < mlm_probability) & ~special
        starts = None
    else:
        starts = word_starts(input_ids, special, word_boundaries)  # [B, L]
        choose = _choose_words if masking == "whole-word" else _choose_spans
        chosen = choose(k_choose, starts, mlm_probability) & ~special  # [B, L]
    chosen = chosen.reshape(groups, group_len)  # [B, L] -> [G, R * L]
    if num_slots < group_len:
        # At most num_slots per group: the first ones in position order are kept (whole
        # words: a word is kept when its last token fits).
        rank = jnp.cumsum(chosen, axis=1) - 1  # [G, R * L]
        if starts is not None:
            rank = jnp.take_along_axis(rank, _word_ends(starts.reshape(groups, group_len)), axis=1)
        chosen = chosen & (rank < num_slots)

    # Chosen positions first (ascending), then the rest: a stable sort of "not chosen".
    order = jnp.argsort(~chosen, axis=1, stable=True)[:, :num_slots].astype(jnp.int32)  # [G, P]
    weights = jnp.take_along_axis(chosen, order, axis=1).astype(jnp.float32)  # [G, P]
    flat_ids = input_ids.reshape(groups, group_len)  # [B, L] -> [G, R * L]
    labels = jnp.take_along_axis(flat_ids, order, axis=1).astype(jnp.int32)  # [G, P]
    chosen = chosen.reshape(batch, seq_len)  # [G, R * L] -> [B, L]

    # 80% <mask>, 10% random token, 10% unchanged.
    action = jax.random.uniform(k_action, (batch, seq_len))
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = jax.random.randint(k_random, (batch, seq_len), 0, vocab_size, dtype=input_ids.dtype)
    corrupted = jnp.where(to_mask, jnp.asarray(mask_token_id, input_ids.dtype),
                          jnp.where(to_random, random_ids, input_ids))
    return MaskedBatch(corrupted.astype(jnp.int32), order, labels, weights)


def word_starts(input_ids: jax.Array, special: jax.Array, word_boundaries) -> jax.Array:
    """bool [B, L]: the token starts a word (the table says so, or it is special, follows a
    special or a word-ending token, or begins the row)."""
    flags = jnp.asarray(word_boundaries, dtype=jnp.uint8)[input_ids]  # [B, L]
    ends = ((flags & ENDS_WORD) != 0) | special
    after_end = jnp.pad(ends[:, :-1], ((0, 0), (1, 0)), constant_values=True)  # [B, L]
    return ((flags & STARTS_WORD) != 0) | special | after_end


def _word_ends(starts: jax.Array) -> jax.Array:
    """int32 [G, N]: the index of the last token of each token's word (``starts`` [G, N])."""
    n = starts.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)
    next_starts = jnp.pad(starts[:, 1:], ((0, 0), (0, 1)), constant_values=True)  # token j + 1 starts a word
    last = jnp.where(next_starts, idx, n - 1)  # [G, N]
    return jax.lax.cummin(last, axis=1, reverse=True)


def _choose_words(key, starts: jax.Array, rate) -> jax.Array:
    """Whole-word masking: each word (its first token's draw) chosen with probability ``rate``."""
    batch, seq_len = starts.shape
    pick = starts & (jax.random.uniform(key, (batch, seq_len)) < rate)  # on words' first tokens
    first = jax.lax.cummax(jnp.where(starts, jnp.arange(seq_len), 0), axis=1)  # each token's word start
    return jnp.take_along_axis(pick, first, axis=1)


def _sample_table(u: jax.Array, cdf: np.ndarray) -> jax.Array:
    """1 + the number of CDF entries below ``u``: a draw from the law of ``cdf`` on 1, 2, ..."""
    return 1 + jnp.sum(u[..., None] >= jnp.asarray(cdf), axis=-1, dtype=jnp.int32)


def _choose_spans(key, starts: jax.Array, rate) -> jax.Array:
    """Span masking in words (module doc): gap, span, gap, span, ... from the stationary state."""
    batch, seq_len = starts.shape
    cycles = seq_len // 2 + 1  # each gap + span covers 2 words or more: enough for L words
    k_state, k_residual, k_span, k_gap = jax.random.split(key, 4)
    rate = jnp.minimum(jnp.asarray(rate, jnp.float32), MAX_SPAN_RATE)
    in_span = jax.random.uniform(k_state, (batch,)) < rate  # the row starts inside a span
    residual = jnp.where(in_span, _sample_table(jax.random.uniform(k_residual, (batch,)), _RESIDUAL_CDF), 0)
    spans = _sample_table(jax.random.uniform(k_span, (batch, cycles)), _SPAN_CDF)  # [B, C]
    # Gaps: geometric on 1, 2, ... with mean SPAN_MEAN (1 - rate) / rate, by inversion.
    success = jnp.clip(rate / (SPAN_MEAN * (1.0 - rate)), 1e-6, 1.0)
    u = 1.0 - jax.random.uniform(k_gap, (batch, cycles))  # (0, 1]
    gaps = 1 + jnp.minimum(jnp.floor(jnp.log(u) / jnp.log1p(-success)), seq_len).astype(jnp.int32)  # [B, C]
    lengths = jnp.concatenate([residual[:, None], jnp.stack([gaps, spans], axis=-1).reshape(batch, 2 * cycles)],
                              axis=1)  # [B, 2C + 1]: span, gap, span, gap, ...
    ends = jnp.cumsum(lengths, axis=1)  # [B, 2C + 1]
    word = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # [B, L]: each token's word index
    interval = jax.vmap(lambda e, w: jnp.searchsorted(e, w, side="right"))(ends, word)  # [B, L]
    return interval % 2 == 0  # even intervals are spans


def row_count_variance(rows: np.ndarray, mask_kwargs: dict, *, seed: int = 0) -> float:
    """The variance of one row's masked count under ``mask_kwargs`` (a mode and its rate),
    measured on ``rows`` [N, L] (a fixed sample of the training blocks) with a fixed key:
    what :func:`default_max_predictions` sizes the slots of whole words and spans from."""
    kw = {k: v for k, v in mask_kwargs.items() if k not in ("max_predictions", "rows_per_group")}
    fn = jax.jit(lambda key, ids: mask_tokens(key, ids, **kw, max_predictions=None).masked_weights.sum(axis=1))
    counts = np.asarray(fn(jax.random.PRNGKey(seed), jnp.asarray(rows, jnp.int32)), dtype=np.float64)
    return float(counts.var(ddof=1)) if len(counts) > 1 else 0.0


def masking_rate(step: jax.Array, start: float, final: float, total_steps: int) -> jax.Array:
    """The rate at ``step`` (a traced int) of a run of ``total_steps`` that masks ``start``
    at its first step and ``final`` at its last, linearly in between (mmBERT lowers it)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)
    return jnp.float32(start) + (jnp.float32(final) - jnp.float32(start)) * frac


def mask_rows(
    row_keys: jax.Array,
    input_ids: jax.Array,
    **kwargs,
) -> MaskedBatch:
    """:func:`mask_tokens` with one key per row ([B] keys), so a row's masking does not
    depend on which batch it lands in (evaluation: results independent of batch size
    and device count)."""
    def one(key, row):
        out = mask_tokens(key, row[None, :], **kwargs)
        return jax.tree_util.tree_map(lambda x: x[0], out)

    return jax.vmap(one)(row_keys, input_ids)
