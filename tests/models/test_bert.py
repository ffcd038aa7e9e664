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
from mlmtool.models import load_model
from mlmtool.models.bert import BertConfig
from tests.test_families import assert_parity, hf_model, perturbed, torch

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


def small_config(name: str) -> BertConfig:
    return BertConfig.from_dict(CASES[name])


@functools.cache
def loaded(name: str, **kw):
    """load_model of a CASES entry (``kw``: load_model's), built once per session."""
    return load_model(CASES[name], **kw)


def padded_batch(config: BertConfig, seed: int = 0, lengths=(16, 11, 5), length: int = 16):
    """input_ids, attention_mask, token_type_ids [B, L] with rows padded at the end."""
    rng = np.random.default_rng(seed)
    # Ids 5.. avoid every special token of both tokenizer conventions (pad is 0 or 1).
    input_ids = rng.integers(5, config.vocab_size, (len(lengths), length)).astype(np.int32)
    attention_mask = np.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
    input_ids[attention_mask == 0] = config.pad_token_id
    token_type_ids = np.zeros_like(input_ids)
    if config.type_vocab_size > 1:
        token_type_ids[:, length // 2:] = 1  # a second segment, to exercise the table
    return input_ids, attention_mask, token_type_ids


@functools.cache
def random_params(case: str):
    """perturbed(init(...)) for a CASES entry, built once per session (init compiles)."""
    return perturbed(loaded(case).init(0))


def flax_logits(module, params, batch, **kw):
    return np.asarray(module.apply({"params": params}, *batch, **kw))


# --------------------------------------------------------------------------- parity with HF


@pytest.mark.slow
def test_hf_checkpoint_loads_with_identical_logits(tmp_path):
    """transformers save_pretrained -> our loader -> the same logits on right- and left-padded
    batches, for the case peculiar to RoBERTa's head (tests/test_families.py runs every model_type)."""
    model = hf_model(CASES["roberta-gelu_new"])
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert BertConfig.from_dict(hf) == small_config("roberta-gelu_new")
    theirs = load_model(hf)
    assert_parity(theirs, theirs.load_hf(tmp_path / "model.safetensors"), model)


def test_roberta_loses_its_padding_offset_in_positions():
    assert loaded("roberta").max_sequence_length == 66 - 2  # positions start after pad_token_id 1
    assert loaded("bert").max_sequence_length == 66


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_bfloat16_checkpoint_loads(tmp_path):
    """transformers may save bf16 weights; plain numpy cannot hold them, the loader must."""
    from safetensors.torch import save_file

    state = loaded("roberta").to_hf(random_params("roberta"))
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in state.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    params = loaded("roberta").load_hf(tmp_path)
    back = loaded("roberta").to_hf(params)
    for key, value in state.items():
        assert back[key].dtype == np.float32
        np.testing.assert_allclose(back[key], value, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- model behaviour


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_init_matches_hf_scheme():
    config = small_config("roberta")
    params = loaded("roberta").init(0)
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


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_dropout():
    params = random_params("roberta")
    batch = padded_batch(small_config("roberta"))
    model = loaded("roberta").module

    def run(deterministic, seed):
        return np.asarray(model.apply({"params": params}, *batch, deterministic=deterministic,
                                      rngs={"dropout": jax.random.PRNGKey(seed)}))

    eval_a, eval_b = run(True, 0), run(True, 1)
    np.testing.assert_array_equal(eval_a, eval_b)  # deterministic ignores the rng
    np.testing.assert_array_equal(eval_a, flax_logits(model, params, batch))  # and needs none
    train_a, train_a2, train_b = run(False, 0), run(False, 0), run(False, 1)
    np.testing.assert_array_equal(train_a, train_a2)  # same rng, same masks
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    with pytest.raises(Exception):  # training without a dropout rng is an error, not silent
        model.apply({"params": params}, *batch, deterministic=False)


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_attention_dropout_alone_changes_outputs():
    """The explicit attention path (used when attention dropout is on) is the same attention."""
    def module(**dropout):
        return load_model({**CASES["bert"], "hidden_dropout_prob": 0.0, **dropout}).module

    params = random_params("bert")
    batch = padded_batch(small_config("bert"))
    plain = module(attention_probs_dropout_prob=0.0)
    fused = flax_logits(plain, params, batch)
    train = plain.apply({"params": params}, *batch, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    # rate 0 -> fused path in both modes
    np.testing.assert_allclose(train, fused, atol=1e-5)
    # explicit softmax path at rate ~0 (dropout keeps all with prob ~1) equals the fused path
    explicit = module(attention_probs_dropout_prob=1e-9).apply(
        {"params": params}, *batch, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_allclose(np.asarray(explicit)[batch[1] == 1], fused[batch[1] == 1], atol=1e-4)
    dropped = module().apply({"params": params}, *batch, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(0)})
    assert not np.allclose(dropped, train)


# --------------------------------------------------------------------------- config


def test_config_from_dict():
    d = {**CASES["bert"], "architectures": ["BertForMaskedLM"], "transformers_version": "5.24.0",
         "classifier_dropout": None}
    assert BertConfig.from_dict(d) == small_config("bert")
    with pytest.raises(ConfigError, match="model_type"):
        BertConfig.from_dict({**d, "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="model_type"):
        BertConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        BertConfig.from_dict({**d, "num_attention_heads": 5})
    with pytest.raises(ConfigError, match="hidden_act"):
        BertConfig.from_dict({**d, "hidden_act": "mish"})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        BertConfig.from_dict({**d, "tie_word_embeddings": False})
    with pytest.raises(ConfigError, match="vocab_size"):
        BertConfig.from_dict({**d, "vocab_size": "1000"})


# --------------------------------------------------------------------------- HF state dicts


@pytest.mark.parametrize("case", ["roberta", "bert"])
def test_state_dict_round_trip(case):
    params = random_params(case)
    state = loaded(case).to_hf(params)
    prefix = CASES[case]["model_type"]
    head = "lm_head" if case == "roberta" else "cls.predictions"
    assert f"{prefix}.encoder.layer.1.intermediate.dense.weight" in state
    assert state[f"{prefix}.encoder.layer.1.intermediate.dense.weight"].shape == (128, 64)  # [out, in]
    assert f"{head}.bias" in state and f"{head}.decoder.weight" not in state
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    back = loaded(case).from_hf(state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_state_dict_legacy_extras_accepted():
    state = loaded("bert").to_hf(random_params("bert"))
    legacy = dict(state)
    legacy["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].copy()
    legacy["cls.predictions.decoder.bias"] = legacy.pop("cls.predictions.bias")
    legacy["bert.embeddings.position_ids"] = np.arange(66)[None]
    legacy["bert.pooler.dense.weight"] = np.zeros((64, 64), np.float32)
    legacy["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
    legacy["bert.embeddings.LayerNorm.gamma"] = legacy.pop("bert.embeddings.LayerNorm.weight")
    back = loaded("bert").from_hf(legacy)
    np.testing.assert_array_equal(loaded("bert").to_hf(back)["cls.predictions.bias"],
                                  state["cls.predictions.bias"])
    untied = dict(legacy)
    untied["cls.predictions.decoder.weight"] = untied["cls.predictions.decoder.weight"] + 1
    with pytest.raises(CheckpointError, match="untied"):
        loaded("bert").from_hf(untied)


def test_state_dict_errors_name_the_keys():
    state = loaded("roberta").to_hf(random_params("roberta"))
    renamed = dict(state)
    renamed["roberta.encoder.layer.0.attention.self.kwery.weight"] = renamed.pop(
        "roberta.encoder.layer.0.attention.self.query.weight")
    with pytest.raises(CheckpointError) as err:
        loaded("roberta").from_hf(renamed)
    assert "roberta.encoder.layer.0.attention.self.kwery.weight" in str(err.value)  # unexpected
    assert "roberta.encoder.layer.0.attention.self.query.weight" in str(err.value)  # missing

    with pytest.raises(CheckpointError, match=r"word_embeddings.weight \(1000, 64\) vs config \(2000, 64\)"):
        load_model({**CASES["roberta"], "vocab_size": 2000}).from_hf(state)
    with pytest.raises(CheckpointError, match="missing keys: .*roberta.encoder.layer.2"):
        load_model({**CASES["roberta"], "num_hidden_layers": 3}).from_hf(state)
    with pytest.raises(CheckpointError, match="missing keys: bert"):  # roberta file, bert config
        loaded("bert").from_hf(state)


def test_safetensors_file_round_trip(tmp_path):
    model = loaded("roberta")
    params = random_params("roberta")
    path = model.save_hf(params, tmp_path / "model.safetensors")
    model.save_hf(params, path)  # overwriting an existing file is fine
    assert os.listdir(tmp_path) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    assert set(read_safetensors(tmp_path)) == set(model.to_hf(params))
    back = model.load_hf(tmp_path)  # a model directory works as well as the file
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)

    with pytest.raises(CheckpointError, match="not found"):
        model.load_hf(tmp_path / "missing.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        model.load_hf(tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        model.save_hf(params, tmp_path / "no" / "model.safetensors")
