"""Masking: rates (15% chosen; of those 80/10/10), specials untouched, slots and weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.masking import default_max_predictions, mask_rows, mask_tokens

SPECIALS = (0, 1, 2, 3, 4)  # <s> <pad> </s> <unk> <mask>
MASK, PAD, VOCAB = 4, 1, 1000


def _batch(rng, b=256, l=128, n_pad=16):
    ids = rng.integers(5, VOCAB, size=(b, l)).astype(np.int32)
    ids[:, 0] = 0
    ids[:, 60] = 2  # a document boundary inside the block: </s> <s>
    ids[:, 61] = 0
    ids[:, l - n_pad:] = PAD
    return jnp.asarray(ids)


def test_rates_and_specials_untouched():
    ids = _batch(np.random.default_rng(0))
    out = mask_tokens(jax.random.PRNGKey(0), ids, special_token_ids=SPECIALS, mask_token_id=MASK,
                      vocab_size=VOCAB, mlm_probability=0.15, max_predictions=None)
    ids, new = np.asarray(ids), np.asarray(out.input_ids)
    special = np.isin(ids, SPECIALS)
    # Specials and padding are never chosen nor changed.
    assert np.array_equal(new[special], ids[special])
    pos, w = np.asarray(out.masked_positions), np.asarray(out.masked_weights)
    chosen = np.zeros_like(ids, dtype=bool)
    rows = np.repeat(np.arange(ids.shape[0])[:, None], pos.shape[1], axis=1)
    chosen[rows[w > 0], pos[w > 0]] = True
    assert not (chosen & special).any()
    n_eligible = (~special).sum()
    n_chosen = chosen.sum()
    rate = n_chosen / n_eligible
    sd = np.sqrt(0.15 * 0.85 / n_eligible)
    assert abs(rate - 0.15) < 5 * sd, rate
    # Labels are the original tokens at the chosen positions.
    assert np.array_equal(np.asarray(out.masked_labels)[w > 0], ids[rows[w > 0], pos[w > 0]])
    # Of the chosen: 80% <mask>, 10% random, 10% unchanged (random may hit the same id: rare).
    masked = (new == MASK) & chosen
    unchanged = (new == ids) & chosen
    other = chosen & ~masked & ~unchanged
    for frac, target in ((masked.sum() / n_chosen, 0.8), (other.sum() / n_chosen, 0.1),
                         (unchanged.sum() / n_chosen, 0.1)):
        assert abs(frac - target) < 5 * np.sqrt(target * (1 - target) / n_chosen) + 0.002, (frac, target)
    # Nothing outside the chosen positions changes.
    assert np.array_equal(new[~chosen], ids[~chosen])


def test_positions_sorted_and_slots_weighted():
    ids = _batch(np.random.default_rng(1), b=64)
    p = default_max_predictions(128, 0.15)
    assert p == 40
    out = mask_tokens(jax.random.PRNGKey(3), ids, special_token_ids=SPECIALS, mask_token_id=MASK,
                      vocab_size=VOCAB, max_predictions=p)
    pos, w = np.asarray(out.masked_positions), np.asarray(out.masked_weights)
    assert pos.shape == (64, p)
    for r in range(64):
        k = int(w[r].sum())
        assert np.all(w[r, :k] == 1) and np.all(w[r, k:] == 0)  # chosen first
        assert np.all(np.diff(pos[r, :k]) > 0)  # ascending


def test_cap_drops_only_excess_and_leaves_them_uncorrupted():
    ids = _batch(np.random.default_rng(2), b=8, n_pad=0)
    out = mask_tokens(jax.random.PRNGKey(5), ids, special_token_ids=SPECIALS, mask_token_id=MASK,
                      vocab_size=VOCAB, mlm_probability=0.5, max_predictions=8)
    w = np.asarray(out.masked_weights)
    assert np.all(w.sum(axis=1) == 8)  # 50% of ~125 eligible: always capped at 8
    changed = (np.asarray(out.input_ids) != np.asarray(ids)).sum(axis=1)
    assert np.all(changed <= 8)


def test_deterministic_per_key_and_rowwise_independent_of_batch():
    ids = _batch(np.random.default_rng(3), b=16)
    kw = dict(special_token_ids=SPECIALS, mask_token_id=MASK, vocab_size=VOCAB)
    a = mask_tokens(jax.random.PRNGKey(7), ids, **kw)
    b = mask_tokens(jax.random.PRNGKey(7), ids, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(9), i))(jnp.arange(16))
    whole = mask_rows(keys, ids, **kw)
    half = mask_rows(keys[8:], ids[8:], **kw)
    assert np.array_equal(np.asarray(whole.input_ids)[8:], np.asarray(half.input_ids))


@pytest.mark.parametrize("seq_len,p", [(128, 0.15), (512, 0.15), (16, 0.15), (8, 0.9)])
def test_default_slots_bounded(seq_len, p):
    n = default_max_predictions(seq_len, p)
    assert 1 <= n <= seq_len and (n % 8 == 0 or n == seq_len)


def test_groups_share_slots_and_choose_the_same_tokens_as_rows():
    """Groups of rows share their slots: same corruption as per-row slots with the same key,
    positions index the group's rows laid end to end, and fewer slots cover the same tokens."""
    ids = _batch(np.random.default_rng(4), b=32)
    kw = dict(special_token_ids=SPECIALS, mask_token_id=MASK, vocab_size=VOCAB)
    rows = mask_tokens(jax.random.PRNGKey(11), ids, **kw, max_predictions=None)
    slots = default_max_predictions(128, 0.15, rows=8)
    assert slots < 8 * default_max_predictions(128, 0.15)
    grouped = mask_tokens(jax.random.PRNGKey(11), ids, **kw, max_predictions=slots, rows_per_group=8)
    assert np.array_equal(np.asarray(grouped.input_ids), np.asarray(rows.input_ids))
    pos, lab, w = (np.asarray(x) for x in grouped[1:])
    assert pos.shape == lab.shape == w.shape == (4, slots)
    assert int(w.sum()) == int(np.asarray(rows.masked_weights).sum())  # nothing dropped
    flat = np.asarray(ids).reshape(4, 8 * 128)
    for g in range(4):
        k = int(w[g].sum())
        assert np.all(w[g, :k] == 1) and np.all(w[g, k:] == 0)
        assert np.all(np.diff(pos[g, :k]) > 0)
        assert np.array_equal(lab[g, :k], flat[g, pos[g, :k]])
        # The chosen positions of the group's rows, row r's position i at r * 128 + i.
        row_pos = [r * 128 + p for r in range(8)
                   for p, wt in zip(np.asarray(rows.masked_positions)[g * 8 + r],
                                    np.asarray(rows.masked_weights)[g * 8 + r])
                   if wt]
        assert np.array_equal(pos[g, :k], np.asarray(row_pos))
    with pytest.raises(ValueError, match="does not divide"):
        mask_tokens(jax.random.PRNGKey(11), ids, **kw, max_predictions=slots, rows_per_group=5)


def test_group_cap_drops_only_excess():
    ids = _batch(np.random.default_rng(5), b=8, n_pad=0)
    out = mask_tokens(jax.random.PRNGKey(5), ids, special_token_ids=SPECIALS, mask_token_id=MASK,
                      vocab_size=VOCAB, mlm_probability=0.5, max_predictions=24, rows_per_group=4)
    assert np.all(np.asarray(out.masked_weights).sum(axis=1) == 24)
    changed = (np.asarray(out.input_ids) != np.asarray(ids)).reshape(2, -1).sum(axis=1)
    assert np.all(changed <= 24)
