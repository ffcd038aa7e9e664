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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskedBatch(NamedTuple):
    input_ids: jax.Array         # int32 [B, L]  the corrupted input
    masked_positions: jax.Array  # int32 [G, P]  chosen positions, ascending, then padding slots
    masked_labels: jax.Array     # int32 [G, P]  original token at each chosen position
    masked_weights: jax.Array    # float32 [G, P] 1 for a chosen position, 0 for an unused slot
    # G = B / rows_per_group; a group's positions index its rows laid end to end, [0, B / G * L).


def default_max_predictions(seq_len: int, mlm_probability: float, rows: int = 1) -> int:
    """Slots for a group of ``rows`` rows: mean + 5 sd of Binomial(rows x seq_len, p),
    rounded up to a multiple of 8 (and at most rows x seq_len)."""
    n = rows * seq_len
    mean = n * mlm_probability
    sd = math.sqrt(n * mlm_probability * (1.0 - mlm_probability))
    slots = int(math.ceil((mean + 5.0 * sd) / 8.0) * 8)
    return max(1, min(n, slots))


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    *,
    special_token_ids: tuple[int, ...],
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    max_predictions: int | None = None,
    rows_per_group: int = 1,
) -> MaskedBatch:
    """Corrupt ``input_ids`` [B, L] and return the prediction targets (see module doc).

    Each group of ``rows_per_group`` consecutive rows (which must divide B) shares
    ``max_predictions`` slots.  ``max_predictions=None`` keeps one slot per position
    (P = rows_per_group x L, nothing ever dropped), which is what evaluation uses.
    """
    batch, seq_len = input_ids.shape
    if batch % rows_per_group:
        raise ValueError(f"rows_per_group={rows_per_group} does not divide the batch of {batch} rows")
    groups, group_len = batch // rows_per_group, rows_per_group * seq_len
    num_slots = group_len if max_predictions is None else min(max_predictions, group_len)
    k_choose, k_action, k_random = jax.random.split(rng, 3)

    special = jnp.isin(input_ids, jnp.asarray(special_token_ids, dtype=input_ids.dtype))  # [B, L]
    chosen = (jax.random.uniform(k_choose, (batch, seq_len)) < mlm_probability) & ~special
    chosen = chosen.reshape(groups, group_len)  # [B, L] -> [G, R * L]
    if num_slots < group_len:
        # At most num_slots per group: the first ones in position order are kept.
        rank = jnp.cumsum(chosen, axis=1) - 1  # [G, R * L]
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
