"""What every model family must do, checked for every model_type of the registry
(``mlmtool.models``; each family lists its small configs in ``tiny_test_configs()``):

* transformers v5 ``save_pretrained`` -> our loader -> the same logits on right- and
  left-padded batches (fp32, |delta| <= 1e-4 at real tokens);
* our initialisation -> our export -> ``AutoModelForMaskedLM`` with no missing, unexpected or
  mismatched key, of the family's architecture, with the same logits;
* the jax-free parameter count equals ``eval_shape`` and torch's;
* the no-weight-decay rule equals HF Trainer's ``get_decay_parameter_names``;
* ``mlmtool predict`` equals ``pipeline("fill-mask")`` on the export;
* config.json written by ``init --config`` reads back, through transformers' ``AutoConfig``,
  as the same config;
* logits at ``masked_positions`` are the full logits gathered there; bfloat16 computation is
  close to float32 with float32 master weights; the padding of a row changes nothing at its
  real tokens; an input one token longer than the model is refused.

A new family gets all of this by being registered; its own test file holds only what is
peculiar to it.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.errors import ConfigError
from mlmtool.models import families, load_model
from mlmtool.presets import load_config_file

PARITY_TOL = 1e-4  # fp32 vs PyTorch fp32 (measured ~1e-6 on logits of O(1-10))

CASES = {name: (family, fields) for family in families().values()
         for name, fields in family.tiny_test_configs().items()}

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def hf_model(fields: dict):
    config = transformers.AutoConfig.for_model(fields["model_type"],
                                               **{k: v for k, v in fields.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(config).eval()
    with torch.no_grad():  # every weight non-trivial, biases and norms included
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(loaded, *, left: bool, seed: int = 0, lengths=(16, 11, 5), length: int = 16):
    """input_ids, attention_mask [B, L]: ids avoid the 5 specials; rows padded at the end (or start)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, loaded.config.vocab_size, (len(lengths), length)).astype(np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, length - n:] = 1
        else:
            mask[row, :n] = 1
    ids[mask == 0] = loaded.config.pad_token_id
    return ids, mask


def ours(loaded, params, batch) -> np.ndarray:
    return np.asarray(loaded.module.apply({"params": params}, batch[0], batch[1]))


def theirs(model, batch) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(batch[0], dtype=torch.long),
                    attention_mask=torch.as_tensor(batch[1], dtype=torch.long))
    return out.logits.float().numpy()


def assert_parity(loaded, params, model) -> None:
    for left in (False, True):
        batch = padded_batch(loaded, left=left)
        a, b = ours(loaded, params, batch), theirs(model, batch)
        assert a.shape == b.shape and a.dtype == np.float32
        assert np.abs(b).max() > 1.0  # not trivially small
        assert float(np.abs(a - b)[batch[1] == 1].max()) <= PARITY_TOL


def perturbed(params, scale: float = 0.1):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(x + scale * jax.random.normal(k, x.shape))
                                                  for x, k in zip(leaves, keys)])


@functools.cache
def _random_params(name: str):
    return perturbed(load_model(CASES[name][1]).init(0))


def _name(fields: dict) -> str:
    return next(name for name, (_, f) in CASES.items() if f is fields)


def random_params(fields: dict):
    """perturbed(init(0)) of a CASES entry, built once per session (init compiles)."""
    return _random_params(_name(fields))


@functools.cache
def _full_logits(name: str) -> np.ndarray:
    loaded = load_model(CASES[name][1])
    return ours(loaded, _random_params(name), padded_batch(loaded, left=False))


def full_logits(fields: dict) -> np.ndarray:
    """Float32 logits of ``random_params`` on the right-padded ``padded_batch``, once per session
    (the unjitted network runs op by op: seconds on a loaded CPU)."""
    return _full_logits(_name(fields))


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


@pytest.mark.slow
def test_transformers_checkpoint_loads_with_identical_logits(case, tmp_path):
    _, fields = case
    model = hf_model(fields)
    model.save_pretrained(tmp_path)
    loaded = load_model(load_config_file(tmp_path / "config.json"))
    assert_parity(loaded, loaded.load_hf(tmp_path), model)


@pytest.mark.slow
def test_export_loads_in_transformers(case, tmp_path):
    family, fields = case
    loaded = load_model(fields)
    params = random_params(fields)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    loaded.save_hf(params, tmp_path)
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == family.architecture(fields["model_type"])
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_parity(loaded, params, model.eval())
    # and back: the state dict round trip is exact
    back = loaded.from_hf(loaded.to_hf(params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(back)))


@pytest.mark.slow
def test_parameter_count(case):
    family, fields = case
    loaded = load_model(fields)
    shapes = jax.tree_util.tree_leaves(loaded.abstract_params)
    assert family.parameter_count(fields) == sum(math.prod(x.shape) for x in shapes)
    assert family.parameter_count(fields) == sum(p.numel() for p in hf_model(fields).parameters())


@pytest.mark.slow
def test_no_weight_decay_rule_is_hf_trainers(case):
    """The family's rule, over our parameter tree, names exactly the tensors HF Trainer decays."""
    _, fields = case
    loaded = load_model(fields)
    model = hf_model(fields)
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, model))
    # HF Trainer optimizes only what requires grad (RoFormer's sinusoidal table does not): no decay there
    decayed &= {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    mask = dict(zip((tuple(str(k.key) for k in path) for path, _ in
                     jax.tree_util.tree_flatten_with_path(loaded.abstract_params)[0]),
                    jax.tree_util.tree_leaves(loaded.decay_mask(loaded.abstract_params))))
    assert len(mask) == len(loaded.weight_table.entries)
    for entry in loaded.weight_table.entries:
        if "layernorm" in entry.hf_key.split(".")[0].lower():
            # HF Trainer's name heuristic ("layernorm" anywhere in the name) drops every tensor under
            # RobertaPreLayerNorm's `roberta_prelayernorm.` prefix: judge those by the rest of the name
            rest = entry.hf_key.split(".", 1)[1]
            assert mask[entry.path] == (not rest.endswith("bias") and "LayerNorm" not in rest), entry.hf_key
        else:
            assert mask[entry.path] == (entry.hf_key in decayed), entry.hf_key


def family_tokenizer(family, fields: dict, path):
    """A small tokenizer of the family's conventions (its specials, post-processor and
    tokenizer_config.json) written into ``path``; returns (specials, ``fields`` with its
    vocab_size and special ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mlmtool.modeldir import ModelDir
    from mlmtool.data.tokenizer_train import add_post_processor, tokenizer_files

    defaults = family.tokenizer[fields["model_type"]]
    specials = defaults.specials_for(defaults.algorithm)
    tok = Tokenizer(models.WordLevel(unk_token=specials.unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot today , said the king"]
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=list(specials.order)))
    add_post_processor(tok, "wordpiece", specials)
    mdir = ModelDir(path, create=True)
    for name, text in tokenizer_files(tok, "wordpiece", model_max_length=32, specials=specials).items():
        (mdir.path / name).write_text(text, encoding="utf-8")
    ids = {t: i for i, t in enumerate(specials.order)}
    return specials, {**fields, "vocab_size": tok.get_vocab_size(),
                      **{field: ids[specials.role(role)] for field, role in defaults.config_ids}}


@pytest.mark.slow
def test_init_from_a_directory_transformers_wrote(case, tmp_path):
    """``init DIR --from PATH`` of a transformers ``save_pretrained`` directory: DIR's initial
    weights are PATH's, exactly."""
    from mlmtool.init_from import init_from
    from mlmtool.modeldir import ModelDir

    family, fields = case
    _, config = family_tokenizer(family, fields, tmp_path / "src")
    model = hf_model(config)
    model.save_pretrained(tmp_path / "src")
    mdir = ModelDir(tmp_path / "dir", create=True)
    init_from(mdir, tmp_path / "src")
    loaded = load_model(mdir.read_config())
    ours, want = loaded.load_hf(mdir.init_weights_path), loaded.load_hf(tmp_path / "src")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(want)))
    assert_parity(loaded, ours, model)


@pytest.mark.slow
def test_predict_equals_the_fill_mask_pipeline(case, tmp_path):
    """An export with a tokenizer of the family's conventions: ``mlmtool predict`` gives the
    pipeline's tokens and scores."""
    from mlmtool.modeldir import ModelDir
    from mlmtool.predict import fill_mask

    family, fields = case
    specials, config = family_tokenizer(family, fields, tmp_path / "m")
    mdir = ModelDir(tmp_path / "m")
    mdir.write_config({**config, "initializer_range": 0.5})
    loaded = load_model(mdir.read_config())
    loaded.save_hf(loaded.init(3), mdir.weights_path)

    texts = [f"the cat {specials.mask} on the mat", f"{specials.mask} dog ran in the {specials.mask}"]
    got = fill_mask(mdir, texts, top_k=3, checkpoint="export")
    fill = transformers.pipeline("fill-mask", model=str(mdir.path), top_k=3, device="cpu")
    for text, ours_ in zip(texts, got):
        want = fill(text)
        flat_ours = [p for group in ours_ for p in (group if isinstance(group, list) else [group])]
        flat_want = [p for group in want for p in (group if isinstance(group, list) else [group])]
        assert [p["token_str"] for p in flat_ours] == [p["token_str"] for p in flat_want]
        assert all(abs(a["score"] - b["score"]) <= 1e-4 for a, b in zip(flat_ours, flat_want))


def test_a_checkpoints_shapes_name_the_config_fields(case):
    """``checkpoint.config_fields`` (the sizes named when config.json no longer fits a
    checkpoint) reads the family's own fields from its parameter tree."""
    from mlmtool.training.checkpoint import config_fields

    family, fields = case
    shapes = {jax.tree_util.keystr(k): tuple(v.shape)
              for k, v in jax.tree_util.tree_flatten_with_path(load_model(fields).abstract_params)[0]}
    found = config_fields(shapes)
    assert found == family.fields_from_shapes(shapes) and "vocab_size" in found
    assert all(found[k] == fields[k] for k in found), (found, fields)


def test_config_json_reads_back_through_transformers(case, tmp_path):
    """``init --config FILE``'s config.json: transformers' AutoConfig reads it as the family's
    model_type, and its fields parse (ours and theirs) to the config they came from."""
    from mlmtool.modeldir import ModelDir
    from mlmtool.presets import build_config

    family, fields = case
    (tmp_path / "in.json").write_text(json.dumps(fields))
    mdir = ModelDir(tmp_path / "m", create=True)
    mdir.write_config(build_config(from_config=tmp_path / "in.json"))
    theirs = transformers.AutoConfig.from_pretrained(mdir.path)
    assert theirs.model_type == fields["model_type"]
    want = family.parse_config(fields)
    assert family.parse_config(theirs.to_dict()) == want == family.parse_config(mdir.read_config())


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_masked_positions_gather_before_head(case):
    """Logits at ``masked_positions`` [G, P] are the full logits gathered there (float32)."""
    _, fields = case
    loaded = load_model(fields)
    params = random_params(fields)
    ids, mask = padded_batch(loaded, left=False)
    full = full_logits(fields)
    positions = np.array([[0, 3, 15], [1, 2, 10], [4, 0, 0]], dtype=np.int32)
    gathered = np.asarray(loaded.module.apply({"params": params}, ids, mask, masked_positions=positions))
    assert gathered.shape == (3, 3, loaded.config.vocab_size) and gathered.dtype == np.float32
    np.testing.assert_allclose(gathered, np.take_along_axis(full, positions[:, :, None], axis=1), atol=1e-5, rtol=0)


# bfloat16 keeps 8 mantissa bits (a relative error of 2^-9 per rounding).  Measured max |delta|
# at the real tokens over the largest |logit| (~1.5-2.5): 0.5% (modernbert) to 1.6% (albert);
# the bound leaves headroom and still catches a wrong op (which moves logits by O(1)).
BF16_REL_TOL = 0.04


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_bfloat16_compute_close_to_float32(case):
    _, fields = case
    loaded, half = load_model(fields), load_model(fields, dtype="bfloat16")
    params = random_params(fields)
    batch = padded_batch(loaded, left=False)
    fp32, bf16 = full_logits(fields), ours(half, params, batch)
    assert bf16.dtype == np.float32  # logits always float32
    variables = jax.eval_shape(half.module.init, jax.random.PRNGKey(0), batch[0])  # master weights stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    diff = float(np.abs(bf16 - fp32)[batch[1] == 1].max())
    assert 0 < diff < BF16_REL_TOL * float(np.abs(fp32).max()), diff


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_padding_changes_nothing_at_the_real_tokens(case):
    """A right-padded row's logits at its real tokens: those of the row alone, whatever ids
    sit in its padding."""
    _, fields = case
    loaded = load_model(fields)
    params = random_params(fields)
    ids, mask = padded_batch(loaded, left=False)
    alone = ours(loaded, params, (ids[2:, :5], mask[2:, :5]))  # row 2 has 5 real tokens
    junk = np.where(mask == 1, ids, np.random.default_rng(1).integers(5, loaded.config.vocab_size, ids.shape))
    for padded in (full_logits(fields), ours(loaded, params, (junk.astype(np.int32), mask))):  # pad ids, others
        np.testing.assert_allclose(padded[2, :5], alone[0], atol=1e-5)


def test_a_sequence_longer_than_the_model_is_refused(case):
    family, fields = case
    loaded = load_model(fields)
    n = loaded.max_sequence_length
    assert n == family.max_sequence_length(fields)
    params = random_params(fields)
    longest = jax.eval_shape(lambda p: loaded.module.apply({"params": p}, np.full((1, n), 7, np.int32)), params)
    assert longest.shape == (1, n, fields["vocab_size"])
    with pytest.raises(ConfigError, match=f"sequence length {n + 1} exceeds the model's maximum {n}"):
        loaded.module.apply({"params": params}, np.full((1, n + 1), 7, np.int32))
