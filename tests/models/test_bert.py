"""Tests for the BERT family (mlmtool.models.bert, bert_flax) and mlmtool.hf_weights.

Parity is checked against the transformers v5 PyTorch classes in both directions: HF weights
loaded into our Flax model, and our weights loaded into HF with no missing/unexpected keys.
(tests/test_families.py runs the checks every family shares over the registry.)
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.errors import CheckpointError, ConfigError
from mlmtool.hf_weights import read_safetensors
from tests.model_helpers import (
    MaskedLM,
    ModelConfig,
    from_hf_state_dict,
    hf_dict,
    init_params,
    load_safetensors,
    save_safetensors,
    to_hf_state_dict,
)

PARITY_TOL = 1e-4  # fp32 vs PyTorch fp32; measured max |delta| ~1e-6 with logits of O(1-10)

# Small but complete: 2 layers, 4 heads of 16, 66 positions (64 tokens + RoBERTa's offset).
SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=66)
CASES = {
    # model_type, pad id, type vocab, eps and activation as the HF classes use them.
    "roberta": dict(model_type="roberta", pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5,
                    hidden_act="gelu", **SMALL),
    "bert": dict(model_type="bert", pad_token_id=0, type_vocab_size=2, layer_norm_eps=1e-12,
                 hidden_act="gelu", **SMALL),
    # RoBERTa's HF head always uses exact GELU, whatever hidden_act says: check we copy that.
    "roberta-gelu_new": dict(model_type="roberta", pad_token_id=1, type_vocab_size=1,
                             layer_norm_eps=1e-5, hidden_act="gelu_new", **SMALL),
}


def small_config(name: str) -> ModelConfig:
    return ModelConfig(**CASES[name])


def padded_batch(config: ModelConfig, seed: int = 0, lengths=(16, 11, 5), length: int = 16,
                 left: bool = False):
    """input_ids, attention_mask, token_type_ids [B, L] with rows padded at the end (or start)."""
    rng = np.random.default_rng(seed)
    # Ids 5.. avoid every special token of both tokenizer conventions (pad is 0 or 1).
    input_ids = rng.integers(5, config.vocab_size, (len(lengths), length)).astype(np.int32)
    attention_mask = np.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        if left:
            attention_mask[row, length - n:] = 1
        else:
            attention_mask[row, :n] = 1
    input_ids[attention_mask == 0] = config.pad_token_id
    token_type_ids = np.zeros_like(input_ids)
    if config.type_vocab_size > 1:
        token_type_ids[:, length // 2:] = 1  # a second segment, to exercise the table
    return input_ids, attention_mask, token_type_ids


def perturbed(params, seed: int = 1, scale: float = 0.1):
    """Add noise everywhere so biases/LayerNorms are not the trivial 0/1 of a fresh init."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [np.asarray(x + scale * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


@functools.lru_cache(maxsize=None)
def random_params(case: str):
    """perturbed(init_params(...)) for a CASES entry, built once per session (init compiles)."""
    return perturbed(init_params(small_config(case), jax.random.PRNGKey(0)))


def flax_logits(config, params, batch, **kw):
    input_ids, attention_mask, token_type_ids = batch
    return np.asarray(MaskedLM(config, **kw.pop("module_kw", {})).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids, **kw))


# --------------------------------------------------------------------------- torch helpers


def hf_classes(model_type: str):
    import transformers

    if model_type == "roberta":
        return transformers.RobertaConfig, transformers.RobertaForMaskedLM
    return transformers.BertConfig, transformers.BertForMaskedLM


def hf_config(config: ModelConfig):
    config_cls, _ = hf_classes(config.model_type)
    fields = hf_dict(config)
    del fields["model_type"]
    return config_cls(**fields)


def torch_logits(model, batch) -> np.ndarray:
    import torch

    input_ids, attention_mask, token_type_ids = (torch.as_tensor(x, dtype=torch.long) for x in batch)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    return out.logits.float().numpy()


def max_diff_on_tokens(a, b, attention_mask) -> float:
    return float(np.abs(a - b)[attention_mask == 1].max())


@pytest.fixture(scope="module")
def torch_mod():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return torch


# --------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("case", ["roberta-gelu_new"])
def test_hf_checkpoint_loads_with_identical_logits(torch_mod, tmp_path, case):
    """(a) transformers save_pretrained -> our loader -> same logits on a padded batch, for the
    case peculiar to RoBERTa's head (tests/test_families.py runs every model_type)."""
    torch = torch_mod
    config = small_config(case)
    _, model_cls = hf_classes(config.model_type)
    model = model_cls(hf_config(config)).eval()
    with torch.no_grad():  # make every weight non-trivial, including biases and LayerNorms
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)

    loaded_config = ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert loaded_config == config
    params = load_safetensors(tmp_path / "model.safetensors", loaded_config)
    # Right padding as we batch; left padding too, which RoBERTa's position ids
    # (counted over non-pad tokens only) make different from plain arange.
    for left in (False, True):
        batch = padded_batch(config, left=left)
        ours = flax_logits(loaded_config, params, batch)
        theirs = torch_logits(model, batch)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.abs(theirs).max() > 1.0  # the comparison is not trivially small
        assert max_diff_on_tokens(ours, theirs, batch[1]) <= PARITY_TOL


def test_our_config_json_loads_in_transformers(torch_mod, tmp_path):
    import transformers

    from mlmtool.modeldir import ModelDir
    from mlmtool.presets import build_config

    for case in ("roberta", "bert"):
        config = small_config(case)
        (tmp_path / "in.json").write_text(json.dumps(hf_dict(config)))
        mdir = ModelDir(tmp_path / case, create=True)
        mdir.write_config(build_config(from_config=tmp_path / "in.json"))
        hf = transformers.AutoConfig.from_pretrained(mdir.path)
        assert hf.model_type == config.model_type
        assert ModelConfig.from_dict(hf.to_dict()) == config
        assert ModelConfig.from_dict(mdir.read_config()) == config


def test_bfloat16_checkpoint_loads(torch_mod, tmp_path):
    """transformers may save bf16 weights; plain numpy cannot hold them, the loader must."""
    import torch
    from safetensors.torch import save_file

    config = small_config("roberta")
    state = to_hf_state_dict(random_params("roberta"), config)
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in state.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params = load_safetensors(tmp_path, config)
    back = to_hf_state_dict(params, config)
    for key, value in state.items():
        assert back[key].dtype == np.float32
        np.testing.assert_allclose(back[key], value, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- model behaviour


def test_init_matches_hf_scheme():
    config = small_config("roberta")
    params = init_params(config, jax.random.PRNGKey(0))
    emb = params["embeddings"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    # padding rows zeroed (word table; position table for RoBERTa), others N(0, 0.02)
    assert not np.any(emb["word_embeddings"]["embedding"][config.pad_token_id])
    assert not np.any(emb["position_embeddings"]["embedding"][config.pad_token_id])
    assert abs(float(np.std(emb["word_embeddings"]["embedding"])) - 0.02) < 0.002
    layer = params["encoder"]["layer"]["1"]
    assert abs(float(np.std(layer["intermediate"]["dense"]["kernel"])) - 0.02) < 0.002
    assert not np.any(layer["attention"]["self"]["query"]["bias"])
    assert np.all(layer["output"]["LayerNorm"]["scale"] == 1)
    assert not np.any(params["lm_head"]["bias"])
    assert sorted(params["encoder"]["layer"]) == ["0", "1"]


def test_masked_positions_gather_before_head():
    config = small_config("bert")
    params = random_params("bert")
    batch = padded_batch(config)
    full = flax_logits(config, params, batch)
    positions = np.array([[0, 3, 15], [1, 2, 10], [4, 0, 0]], dtype=np.int32)  # [B, P]
    gathered = flax_logits(config, params, batch, masked_positions=positions)
    assert gathered.shape == (3, 3, config.vocab_size) and gathered.dtype == np.float32
    expected = np.take_along_axis(full, positions[:, :, None], axis=1)
    np.testing.assert_allclose(gathered, expected, atol=1e-5, rtol=0)


def test_bfloat16_compute_close_to_float32():
    config = small_config("roberta")
    params = random_params("roberta")
    batch = padded_batch(config)
    fp32 = flax_logits(config, params, batch)
    bf16 = flax_logits(config, params, batch, module_kw=dict(dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32  # logits always float32
    # params stay float32 master weights
    variables = MaskedLM(config, dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), batch[0])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    # bf16 keeps 8 mantissa bits (rel. error 2^-9 ~ 2e-3 per rounding). Measured max |delta|
    # ~0.03 on logits of magnitude ~3 (2 layers); 0.1 leaves headroom but still catches a
    # wrong op (which moves logits by O(1)).
    diff = max_diff_on_tokens(bf16, fp32, batch[1])
    assert 0 < diff < 0.1, diff


def test_dropout():
    config = small_config("roberta")
    params = random_params("roberta")
    batch = padded_batch(config)
    model = MaskedLM(config)

    def run(deterministic, seed):
        return np.asarray(model.apply({"params": params}, *batch, deterministic=deterministic,
                                      rngs={"dropout": jax.random.PRNGKey(seed)}))

    eval_a, eval_b = run(True, 0), run(True, 1)
    np.testing.assert_array_equal(eval_a, eval_b)  # deterministic ignores the rng
    np.testing.assert_array_equal(eval_a, flax_logits(config, params, batch))  # and needs none
    train_a, train_a2, train_b = run(False, 0), run(False, 0), run(False, 1)
    np.testing.assert_array_equal(train_a, train_a2)  # same rng, same masks
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    with pytest.raises(Exception):  # training without a dropout rng is an error, not silent
        model.apply({"params": params}, *batch, deterministic=False)


def test_attention_dropout_alone_changes_outputs():
    """The explicit attention path (used when attention dropout is on) is the same attention."""
    config = ModelConfig(**{**CASES["bert"], "hidden_dropout_prob": 0.0,
                            "attention_probs_dropout_prob": 0.0})
    params = random_params("bert")
    batch = padded_batch(config)
    model = MaskedLM(config)
    train = model.apply({"params": params}, *batch, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(0)})
    # rate 0 -> fused path in both modes
    np.testing.assert_allclose(train, flax_logits(config, params, batch), atol=1e-5)
    # explicit softmax path at rate ~0 (dropout keeps all with prob ~1) equals the fused path
    tiny = ModelConfig(**{**CASES["bert"], "hidden_dropout_prob": 0.0,
                          "attention_probs_dropout_prob": 1e-9})
    explicit = MaskedLM(tiny).apply({"params": params}, *batch, deterministic=False,
                                    rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_allclose(np.asarray(explicit)[batch[1] == 1],
                               flax_logits(config, params, batch)[batch[1] == 1], atol=1e-4)
    real = ModelConfig(**{**CASES["bert"], "hidden_dropout_prob": 0.0})
    dropped = MaskedLM(real).apply({"params": params}, *batch, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(dropped, train)


def test_padding_does_not_leak():
    """Real-token logits don't depend on what sits in padded positions."""
    config = small_config("roberta")
    params = random_params("roberta")
    input_ids, attention_mask, token_type_ids = padded_batch(config)
    short = flax_logits(config, params, (input_ids[2:, :5], attention_mask[2:, :5], token_type_ids[2:, :5]))
    padded = flax_logits(config, params, (input_ids, attention_mask, token_type_ids))
    np.testing.assert_allclose(padded[2, :5], short[0], atol=1e-5)


def test_sequence_too_long_is_refused():
    config = small_config("roberta")  # 66 positions - pad offset 2 = 64 tokens
    assert config.max_sequence_length == 64
    params = random_params("roberta")
    MaskedLM(config).apply({"params": params}, np.full((1, 64), 7, np.int32))
    with pytest.raises(ConfigError, match="exceeds"):
        MaskedLM(config).apply({"params": params}, np.full((1, 65), 7, np.int32))


# --------------------------------------------------------------------------- config


def test_config_from_dict():
    d = {**CASES["bert"], "architectures": ["BertForMaskedLM"], "transformers_version": "5.24.0",
         "classifier_dropout": None}
    assert ModelConfig.from_dict(d) == small_config("bert")
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict({**d, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelConfig.from_dict({**d, "num_attention_heads": 5})
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_dict({**d, "hidden_act": "mish"})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_dict({**d, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict({**d, "vocab_size": "1000"})


# --------------------------------------------------------------------------- HF state dicts


@pytest.mark.parametrize("case", ["roberta", "bert"])
def test_state_dict_round_trip(case):
    config = small_config(case)
    params = random_params(case)
    state = to_hf_state_dict(params, config)
    prefix = config.model_type
    head = "lm_head" if case == "roberta" else "cls.predictions"
    assert f"{prefix}.encoder.layer.1.intermediate.dense.weight" in state
    assert state[f"{prefix}.encoder.layer.1.intermediate.dense.weight"].shape == (128, 64)  # [out, in]
    assert f"{head}.bias" in state and f"{head}.decoder.weight" not in state
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    back = from_hf_state_dict(state, config)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_state_dict_legacy_extras_accepted():
    config = small_config("bert")
    params = random_params("bert")
    state = to_hf_state_dict(params, config)
    legacy = dict(state)
    legacy["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].copy()
    legacy["cls.predictions.decoder.bias"] = legacy.pop("cls.predictions.bias")
    legacy["bert.embeddings.position_ids"] = np.arange(66)[None]
    legacy["bert.pooler.dense.weight"] = np.zeros((64, 64), np.float32)
    legacy["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
    legacy["bert.embeddings.LayerNorm.gamma"] = legacy.pop("bert.embeddings.LayerNorm.weight")
    back = from_hf_state_dict(legacy, config)
    np.testing.assert_array_equal(to_hf_state_dict(back, config)["cls.predictions.bias"],
                                  state["cls.predictions.bias"])
    untied = dict(legacy)
    untied["cls.predictions.decoder.weight"] = untied["cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="untied"):
        from_hf_state_dict(untied, config)


def test_state_dict_errors_name_the_keys():
    config = small_config("roberta")
    state = to_hf_state_dict(random_params("roberta"), config)
    renamed = dict(state)
    renamed["roberta.encoder.layer.0.attention.self.kwery.weight"] = renamed.pop(
        "roberta.encoder.layer.0.attention.self.query.weight")
    with pytest.raises(CheckpointError) as err:
        from_hf_state_dict(renamed, config)
    assert "roberta.encoder.layer.0.attention.self.kwery.weight" in str(err.value)  # unexpected
    assert "roberta.encoder.layer.0.attention.self.query.weight" in str(err.value)  # missing

    with pytest.raises(CheckpointError, match=r"word_embeddings.weight \(1000, 64\) vs config \(2000, 64\)"):
        from_hf_state_dict(state, ModelConfig(**{**CASES["roberta"], "vocab_size": 2000}))
    with pytest.raises(CheckpointError, match="missing keys: .*roberta.encoder.layer.2"):
        from_hf_state_dict(state, ModelConfig(**{**CASES["roberta"], "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing keys: bert"):  # roberta file, bert config
        from_hf_state_dict(state, small_config("bert"))


def test_safetensors_file_round_trip(tmp_path):
    config = small_config("roberta")
    params = random_params("roberta")
    path = save_safetensors(params, config, tmp_path / "model.safetensors")
    save_safetensors(params, config, path)  # overwriting an existing file is fine
    assert os.listdir(tmp_path) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert set(read_safetensors(tmp_path)) == set(to_hf_state_dict(params, config))
    back = load_safetensors(tmp_path, config)  # a model directory works as well as the file
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)

    with pytest.raises(CheckpointError, match="not found"):
        load_safetensors(tmp_path / "missing.safetensors", config)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_safetensors(tmp_path / "broken.safetensors", config)
    with pytest.raises(CheckpointError, match="does not exist"):
        save_safetensors(params, config, tmp_path / "no" / "model.safetensors")
