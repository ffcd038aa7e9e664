"""Fill-mask predictions from the Flax model, in the format of HF's fill-mask pipeline.

For each text, each ``<mask>`` gets the ``top_k`` most probable tokens (softmax over the
vocabulary at that position) as ``{"score", "token", "token_str", "sequence"}``; a text
with one mask gives a list of those objects, with several masks a list per mask (as
``transformers.pipeline("fill-mask")`` returns).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlmtool.errors import DataError


def load_tokenizer(mdir):
    from transformers import AutoTokenizer

    mdir.require_tokenizer()
    return AutoTokenizer.from_pretrained(str(mdir.path))


@functools.lru_cache(maxsize=4)
def _probabilities_fn(family_config, network, tokenizer_size: int | None = None):
    """Jitted (params, ids, mask) -> softmax probabilities [B, L, V], one per model config, so
    repeated calls (and texts padded to the same length) reuse the compiled function.
    ``tokenizer_size`` < V (a padded embedding matrix): the padding ids' logits are -inf, so
    they get probability 0 and are never predicted (they decode to no token)."""
    model = network(family_config)

    def probabilities(p, i, m):
        logits = model.apply({"params": p}, i, attention_mask=m)  # [B, L, V]
        if tokenizer_size is not None and tokenizer_size < logits.shape[-1]:
            real = jnp.arange(logits.shape[-1]) < tokenizer_size  # [V]
            logits = jnp.where(real, logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(probabilities)


def fill_mask(mdir, texts: list[str], *, top_k: int = 5, checkpoint: str = "latest") -> list:
    from mlmtool.runtime import sharding as sh
    from mlmtool.training.checkpoint import load_params
    from mlmtool.models import load_model
    from mlmtool.models.loaded import network_class

    if top_k < 1:
        raise DataError("--top-k must be at least 1", "e.g. --top-k 5")
    config = mdir.read_config()  # its errors first: transformers' AutoTokenizer reads config.json too
    tok = load_tokenizer(mdir)
    mask = tok.mask_token
    for text in texts:
        if mask not in text:
            raise DataError(f"no {mask} in {text!r}", f"put {mask} where the model should fill in a token")
    loaded = load_model(config)
    mesh = sh.make_mesh(None, devices=jax.devices()[:1])
    params, source = load_params(mdir, loaded, checkpoint, mesh,
                                 sh.state_shardings(mesh, loaded.abstract_params, loaded.param_axes), config=config)
    limit = loaded.max_sequence_length
    for text, ids in zip(texts, tok(texts, verbose=False)["input_ids"]):
        if len(ids) > limit:  # a mask past the cut would get no prediction, silently
            short = text if len(text) <= 60 else text[:57] + "..."
            raise DataError(f"the text {short!r} is {len(ids):,} tokens long, but the model reads at most {limit:,} "
                            "(max_position_embeddings)", "shorten the text around its mask")
    # Padded to a multiple of 8 (masked out) so that texts of similar lengths share a compilation.
    # (Every text fits: checked above.  No truncation here: transformers refuses a max_length
    # that is not a multiple of pad_to_multiple_of.)
    enc = tok(texts, padding=True, pad_to_multiple_of=8, return_tensors="np")
    if enc["input_ids"].shape[1] > limit:  # the multiple of 8 overshot the limit
        enc = tok(texts, padding=True, return_tensors="np")
    probs = np.asarray(_probabilities_fn(loaded.config, network_class(loaded.family), len(tok))(
        params, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])))  # [B, L, V]
    if not np.isfinite(probs).all():
        from mlmtool.errors import CheckpointError

        raise CheckpointError(f"the model's predictions are not finite (nan/inf): the weights of {source} hold "
                              "inf or nan", "predict from another checkpoint (--checkpoint STEP), or train again")
    results = []
    for row, ids in enumerate(enc["input_ids"]):
        ids = ids[enc["attention_mask"][row].astype(bool)]
        positions = np.flatnonzero(ids == tok.mask_token_id)
        single = len(positions) == 1
        per_mask = []
        for pos in positions:
            p = probs[row, pos]
            top = np.argsort(-p, kind="stable")[:top_k]
            preds = []
            for token_id in top:
                filled = ids.copy()
                filled[pos] = token_id
                preds.append({
                    "score": float(p[token_id]),
                    "token": int(token_id),
                    "token_str": tok.decode([int(token_id)]),
                    "sequence": tok.decode(filled, skip_special_tokens=single),
                })
            per_mask.append(preds)
        results.append(per_mask[0] if single else per_mask)
    return results
