"""Masking: rates (15% chosen; of those 80/10/10), specials untouched, slots and weights; whole-word and
span masking (rates, whole words, SpanBERT's span lengths); word starts from each kind of tokenizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.training.masking import (SPAN_MEAN, default_max_predictions, mask_rows, mask_tokens, row_count_variance,
                                      word_starts)
from mlmtool.data.tokenizer_facts import ENDS_WORD, STARTS_WORD, word_boundaries

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


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
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


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
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


# -- whole-word and span masking ---------------------------------------------------------------



def _table(rng):
    """A vocabulary where 60% of the pieces start a word, 2% are whitespace (end one too)."""
    table = np.where(rng.random(VOCAB) < 0.6, STARTS_WORD, 0).astype(np.uint8)
    table[rng.random(VOCAB) < 0.02] = STARTS_WORD | ENDS_WORD
    table[list(SPECIALS)] = STARTS_WORD | ENDS_WORD
    return table


def _chosen(out, shape):
    pos, w = np.asarray(out.masked_positions), np.asarray(out.masked_weights)
    chosen = np.zeros(shape, bool)
    rows = np.repeat(np.arange(shape[0])[:, None], pos.shape[1], axis=1)
    chosen[rows[w > 0], pos[w > 0]] = True
    return chosen


@pytest.mark.parametrize("mode", ["token", "whole-word", "span"])
@pytest.mark.parametrize("rate", [0.15, 0.4])
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_modes_mask_the_rate_of_tokens_and_never_specials(mode, rate):
    rng = np.random.default_rng(6)
    table = _table(rng)
    ids = _batch(rng, b=512)
    out = mask_tokens(jax.random.PRNGKey(13), ids, special_token_ids=SPECIALS, mask_token_id=MASK, vocab_size=VOCAB,
                      mlm_probability=rate, max_predictions=None, masking=mode, word_boundaries=table)
    ids, new = np.asarray(ids), np.asarray(out.input_ids)
    special = np.isin(ids, SPECIALS)
    chosen = _chosen(out, ids.shape)
    assert not (chosen & special).any() and np.array_equal(new[special], ids[special])
    assert np.array_equal(new[~chosen], ids[~chosen])
    # Every non-special token is chosen with probability `rate`: the share of tokens, within
    # 5 sd of the measured spread of the rows' counts (words and spans vary more than tokens).
    counts = chosen.sum(axis=1)
    sd = counts.std() * np.sqrt(len(counts)) / (~special).sum()
    assert abs(counts.sum() / (~special).sum() - rate) < 5 * sd, (mode, counts.sum() / (~special).sum())
    masked = (new == MASK) & chosen  # 80% of the chosen become <mask> in every mode
    assert abs(masked.sum() / chosen.sum() - 0.8) < 5 * np.sqrt(0.16 / chosen.sum())
    if mode == "token":
        return
    starts = np.asarray(word_starts(jnp.asarray(ids), jnp.asarray(special), table))
    word = np.cumsum(starts, axis=1)  # word numbers within each row
    for r in range(ids.shape[0]):  # no word is partly masked
        for w in np.unique(word[r][chosen[r]]):
            assert chosen[r][word[r] == w].all(), (mode, r, w)
    if mode == "span":  # runs of masked words follow SpanBERT's law
        lengths = []
        for r in range(ids.shape[0]):
            first = np.flatnonzero(starts[r])
            masked_words, special_words = chosen[r][first], special[r][first]
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, masked_words.astype(int), 0])))[::2]
            begins = np.flatnonzero(np.diff(np.r_[0, masked_words.astype(int)]) == 1)
            # A run is a whole drawn span when it starts after an unmasked word and no special
            # word lies within the longest span's reach: a test of where it starts, not of its
            # length (which would bias the mean).
            lengths += [n for b, n in zip(begins, runs) if b > 0 and not special_words[b - 1]
                        and b + 10 < len(first) and not special_words[b:b + 11].any()]
        lengths = np.asarray(lengths)
        assert lengths.max() <= 10
        assert abs(lengths.mean() - SPAN_MEAN) < 4 * lengths.std() / np.sqrt(len(lengths)), lengths.mean()


@pytest.mark.parametrize("mode", ["whole-word", "span"])
def test_words_beyond_the_slots_are_dropped_whole(mode):
    rng = np.random.default_rng(7)
    table = _table(rng)
    ids = _batch(rng, b=8, n_pad=0)
    kw = dict(special_token_ids=SPECIALS, mask_token_id=MASK, vocab_size=VOCAB, mlm_probability=0.5,
              masking=mode, word_boundaries=table)
    full = _chosen(mask_tokens(jax.random.PRNGKey(5), ids, **kw, max_predictions=None), ids.shape)
    out = mask_tokens(jax.random.PRNGKey(5), ids, **kw, max_predictions=40, rows_per_group=4)
    w = np.asarray(out.masked_weights)
    assert np.all(w.sum(axis=1) <= 40) and np.all(w.sum(axis=1) > 20)
    pos = np.asarray(out.masked_positions)
    kept = np.zeros(ids.shape, bool).reshape(2, -1)
    for g in range(2):
        kept[g, pos[g][w[g] > 0]] = True
    kept = kept.reshape(ids.shape)
    assert not (kept & ~full).any()
    starts = np.asarray(word_starts(ids, jnp.isin(ids, jnp.asarray(SPECIALS)), table))
    word = np.cumsum(starts, axis=1)
    for r in range(ids.shape[0]):
        for wd in np.unique(word[r][kept[r]]):
            assert kept[r][word[r] == wd].all()  # kept words whole
        # what was dropped is left uncorrupted
        dropped = full[r] & ~kept[r]
        assert np.array_equal(np.asarray(out.input_ids)[r][dropped], np.asarray(ids)[r][dropped])


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_slots_cover_the_measured_spread_and_a_traced_rate_masks_the_same():
    rng = np.random.default_rng(8)
    table = _table(rng)
    ids = _batch(rng, b=128)
    kw = dict(special_token_ids=SPECIALS, mask_token_id=MASK, vocab_size=VOCAB, word_boundaries=table)
    token = row_count_variance(np.asarray(ids), dict(kw, masking="token", mlm_probability=0.15))
    span = row_count_variance(np.asarray(ids), dict(kw, masking="span", mlm_probability=0.15))
    assert 0.7 < token / (103 * 0.15 * 0.85) < 1.3 and span > 4 * token
    assert default_max_predictions(128, 0.15, rows=32, row_variance=span) > default_max_predictions(128, 0.15, rows=32)
    assert default_max_predictions(128, 0.15, rows=32, row_variance=1.0) == default_max_predictions(128, 0.15, rows=32)
    # A rate computed in the step (a schedule) masks what the constant does.
    fixed = mask_tokens(jax.random.PRNGKey(1), ids, **kw, mlm_probability=0.15)
    traced = jax.jit(lambda r: mask_tokens(jax.random.PRNGKey(1), ids, **kw, mlm_probability=r))(jnp.float32(0.15))
    assert all(np.array_equal(a, b) for a, b in zip(fixed, traced))


# -- word starts from tokenizer.json -------------------------------------------------------------

def _tokenizer_json(model: dict, pre: dict | None) -> dict:
    added = [{"id": 0, "content": "<s>", "special": True}, {"id": 1, "content": "<pad>", "special": True}]
    return {"model": model, "pre_tokenizer": pre, "added_tokens": added}


@pytest.mark.parametrize("model,pre,expect", [
    ({"type": "BPE", "vocab": {"<s>": 0, "<pad>": 1, "Ġthe": 2, "re": 3, "Ċ": 4, "ĠĠ": 5, "Ġ": 6, ",": 7}},
     {"type": "ByteLevel", "add_prefix_space": False}, [3, 3, 1, 0, 3, 1, 1, 0]),
    ({"type": "WordPiece", "continuing_subword_prefix": "##", "vocab": {"[CLS]": 0, "[PAD]": 1, "the": 2, "##re": 3,
                                                                        ",": 4}},
     {"type": "BertPreTokenizer"}, [3, 3, 1, 0, 1]),
    ({"type": "Unigram", "vocab": [["<s>", 0.0], ["<pad>", 0.0], ["▁the", -1.0], ["re", -2.0], ["▁", -3.0]]},
     {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, {"type": "Metaspace", "replacement": "▁"}]},
     [3, 3, 1, 0, 1]),
    ({"type": "BPE", "end_of_word_suffix": "</w>", "vocab": {"<s>": 0, "<pad>": 1, "the</w>": 2, "th": 3}},
     {"type": "Whitespace"}, [3, 3, 2, 0]),
], ids=["byte-level-bpe", "wordpiece", "unigram-metaspace", "bpe-suffix"])
def test_word_boundaries_per_tokenizer_kind(model, pre, expect):
    table = word_boundaries(_tokenizer_json(model, pre), vocab_size=len(expect) + 2)
    assert table.tolist() == expect + [3, 3]  # ids past the tokenizer: words of their own


def test_word_boundaries_refuses_a_tokenizer_without_word_marks():
    from mlmtool.errors import ConfigError

    with pytest.raises(ConfigError, match="where words start"):
        word_boundaries(_tokenizer_json({"type": "BPE", "vocab": {"a": 2}}, {"type": "Whitespace"}), 8)


@pytest.mark.parametrize("which", ["bpe_dir", "wordpiece_dir"])
def test_words_of_trained_tokenizers(which, request):
    """With a trained tokenizer, the words the table finds are the text's: whitespace-separated
    for byte-level BPE, BERT's pre-tokens (punctuation apart) for WordPiece."""
    import json

    from tokenizers import Tokenizer

    d = request.getfixturevalue(which)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    table = word_boundaries(json.loads((d / "tokenizer.json").read_text()), tok.get_vocab_size())
    text = "The morning walk,\nher sister's garden  and the kernelized   device driver."
    enc = tok.encode(text)
    ids = jnp.asarray([enc.ids])
    special = jnp.asarray([enc.special_tokens_mask], bool)
    starts = np.asarray(word_starts(ids, special, table))[0]
    words, current = [], ""
    for i, (a, b) in enumerate(enc.offsets):
        if enc.special_tokens_mask[i]:
            continue
        if starts[i] and current:
            words.append(current)
            current = ""
        current += text[a:b]
    words.append(current)
    words = [w.strip() for w in words if w.strip()]  # a newline is a word of its own: not the text's
    if which == "bpe_dir":
        assert words == text.split()
    else:
        assert [w.lower() for w in words] == [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(
            tok.normalizer.normalize_str(text))]  # (lowercased)
