"""ELECTRA beyond the registry's tests (which cover ElectraForMaskedLM): the discriminator
(``ElectraForPreTraining``) both ways against transformers, the generator + discriminator
pair's two exports, the replaced-token-detection objective, and training the pair with an
exact resume (``mlmtool.training.objectives``)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.models import load_model
from mlmtool.models.electra import FAMILY, generator_config
from mlmtool.presets import build_config, load_config_file
from tests.test_families import PARITY_TOL, padded_batch, perturbed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = dict(model_type="electra", vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, hidden_act="gelu_new")
DISCRIMINATOR = {**SMALL, "architectures": ["ElectraForPreTraining"]}
PAIR = {**DISCRIMINATOR, "generator": {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}}


def _hf(cls, fields):
    config = transformers.ElectraConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "generator")})
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _theirs(model, batch):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(batch[0], dtype=torch.long),
                     attention_mask=torch.as_tensor(batch[1], dtype=torch.long)).logits.float().numpy()


def _assert_close(a, b, mask):
    assert a.shape == b.shape and a.dtype == np.float32 and np.abs(b).max() > 0.1
    assert float(np.abs(a - b)[mask == 1].max()) <= PARITY_TOL


@pytest.mark.slow
def test_discriminator_parity_both_ways(tmp_path):
    model = _hf("ElectraForPreTraining", DISCRIMINATOR)
    model.save_pretrained(tmp_path / "theirs")
    loaded = load_model(load_config_file(tmp_path / "theirs" / "config.json"))
    params = loaded.load_hf(tmp_path / "theirs")
    for left in (False, True):
        batch = padded_batch(loaded, left=left)
        _assert_close(np.asarray(loaded.module.apply({"params": params}, *batch)), _theirs(model, batch), batch[1])
    # ours -> transformers, no missing or unexpected key
    ours = load_model(DISCRIMINATOR)
    params = perturbed(ours.init(0))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(DISCRIMINATOR))
    ours.save_hf(params, tmp_path / "ours")
    back, info = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = padded_batch(ours, left=False)
    _assert_close(np.asarray(ours.module.apply({"params": params}, *batch)), _theirs(back.eval(), batch), batch[1])
    assert FAMILY.parameter_count(DISCRIMINATOR) == sum(p.numel() for p in back.parameters())


@pytest.mark.slow
def test_pair_exports_discriminator_and_generator(tmp_path):
    """The pair's parameters -> DIR (ElectraForPreTraining) + DIR/generator (ElectraForMaskedLM):
    both load with no missing key and compute what our towers compute; the embeddings are shared."""
    loaded = load_model(PAIR)
    params = perturbed(loaded.init(0))
    assert FAMILY.parameter_count(PAIR) == sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    d = tmp_path / "pair"
    (d / "generator").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(PAIR))
    (d / "generator" / "config.json").write_text(json.dumps(generator_config(PAIR)))
    loaded.save_hf(params, d / "model.safetensors")
    disc, info = transformers.ElectraForPreTraining.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    gen, info = transformers.ElectraForMaskedLM.from_pretrained(d / "generator", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert gen.config.hidden_size == 16 and disc.config.hidden_size == 32
    assert torch.equal(gen.electra.embeddings.word_embeddings.weight, disc.electra.embeddings.word_embeddings.weight)
    batch = padded_batch(loaded, left=True)
    _assert_close(np.asarray(loaded.module.apply({"params": params}, *batch)), _theirs(gen.eval(), batch), batch[1])
    ours_disc = loaded.module.apply({"params": params}, *batch, method="discriminate")
    _assert_close(np.asarray(ours_disc), _theirs(disc.eval(), batch), batch[1])
    back = loaded.load_hf(d / "model.safetensors")  # both files read back
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(params)),
                                                    jax.tree_util.tree_leaves(back)))


def test_presets_name_the_published_generators():
    for name, disc, gen in (("electra-small", 256, 64), ("electra-base", 768, 256), ("electra-large", 1024, 256)):
        config = build_config(name)
        assert config["architectures"] == ["ElectraForPreTraining"]
        assert (config["hidden_size"], config["generator"]["hidden_size"]) == (disc, gen)
    assert build_config("electra-small")["embedding_size"] == 128
    assert FAMILY.parse_config(build_config("electra-tiny")).objective == "replaced-token-detection"
    assert FAMILY.parse_config(build_config("electra-base-generator")).objective == "mlm"


def test_bad_generator_fields_are_refused():
    from mlmtool.errors import ConfigError

    with pytest.raises(ConfigError, match="generator"):
        FAMILY.parse_config({**PAIR, "generator": {"embedding_size": 8}})
    with pytest.raises(ConfigError, match="architectures"):
        FAMILY.parse_config({**PAIR, "architectures": ["ElectraForMaskedLM"]})
    with pytest.raises(ConfigError, match="generator's"):
        FAMILY.parse_config({**PAIR, "generator": {"hidden_size": 30, "num_attention_heads": 4}})


def test_a_discriminator_alone_is_not_trainable():
    from mlmtool.errors import ConfigError
    from mlmtool.training.objectives import objective_for

    with pytest.raises(ConfigError, match="generator field"):
        objective_for(load_model(DISCRIMINATOR))


def test_replace_masked_writes_only_used_slots():
    from mlmtool.training.objectives import replace_masked

    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 10  # two rows, one group of both
    positions = jnp.asarray([[1, 7, 0]], jnp.int32)  # row 0 pos 1, row 1 pos 1, unused slot at 0
    weights = jnp.asarray([[1.0, 1.0, 0.0]])
    out = np.asarray(replace_masked(ids, positions, weights, jnp.asarray([[99, 98, 97]])))
    want = np.asarray(ids).copy()
    want[0, 1], want[1, 1] = 99, 98
    np.testing.assert_array_equal(out, want)


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_rtd_labels_count_a_correct_sample_as_original():
    """The discriminator's targets: replaced = differs from the original, padding excluded."""
    from mlmtool.training.objectives import ReplacedTokenDetection

    loaded = load_model(PAIR)
    params = loaded.init(0)
    ids = jnp.asarray([[5, 6, 7, 0]], jnp.int32)
    replaced = jnp.asarray([[5, 9, 7, 0]], jnp.int32)
    sums = ReplacedTokenDetection(50.0)._detect(loaded.module, params, replaced, ids, ids != 0, {},
                                                deterministic=True)
    assert float(sums["replaced_sum"]) == 1.0


@pytest.mark.slow
def test_electra_trains_resumes_bit_identically_and_exports_both(tmp_path):
    """electra-tiny: init -> tokenizer -> prepare -> train trains the pair; an interrupted run
    resumes to the uninterrupted one's weights bit for bit; DIR loads as ElectraForPreTraining
    and DIR/generator as ElectraForMaskedLM with no missing key; eval reports both."""
    import shutil

    from mlmtool.hf_weights import read_safetensors
    from mlmtool.modeldir import ModelDir
    from mlmtool.training.train import TrainConfig, Trainer
    from tests.pipeline import invoke, prepared_dir

    (tmp_path / "p").mkdir()
    d = prepared_dir(tmp_path / "p", preset="electra-tiny")
    cfg = TrainConfig(per_device_train_batch_size=8, max_steps=8, learning_rate=1e-3, warmup_steps=2,
                      logging_steps=2, save_steps=3, gradient_accumulation_steps=2)
    a, b = shutil.copytree(d, tmp_path / "a"), shutil.copytree(d, tmp_path / "b")
    out = Trainer(ModelDir(a), cfg).run(say=lambda *x: None)
    assert {"eval_rtd_accuracy", "eval_rtd_loss", "eval_loss"} <= out["eval"].keys()
    assert {"rtd_accuracy", "rtd_loss", "loss"} <= out["train"].keys()
    calls = iter(range(100))
    out = Trainer(ModelDir(b), cfg).run(say=lambda *x: None, stop_requested=lambda: next(calls) == 4)
    assert out["stopped_early"] and out["final_step"] == 5
    out = Trainer(ModelDir(b), cfg).run(say=lambda *x: None)
    assert out["start_step"] == 5 and out["final_step"] == 8
    for sub in ("model.safetensors", "generator/model.safetensors"):
        pa, pb = read_safetensors(a / sub), read_safetensors(b / sub)
        assert pa.keys() == pb.keys()
        for k in pa:
            np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{sub} {k}")
    disc, info = transformers.AutoModelForPreTraining.from_pretrained(b, output_loading_info=True)
    assert type(disc).__name__ == "ElectraForPreTraining"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    gen, info = transformers.AutoModelForMaskedLM.from_pretrained(b / "generator", output_loading_info=True)
    assert type(gen).__name__ == "ElectraForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from mlmtool.predict import fill_mask

    fill = transformers.pipeline("fill-mask", model=str(b / "generator"), top_k=3, device="cpu")
    want = fill("the king [MASK] good night")
    for where in (b, b / "generator"):  # predict uses the generator, from DIR or from DIR/generator
        got = fill_mask(ModelDir(where), ["the king [MASK] good night"], top_k=3, checkpoint="export")[0]
        assert [p["token_str"] for p in got] == [p["token_str"] for p in want]
        assert all(abs(x["score"] - y["score"]) <= 1e-4 for x, y in zip(got, want))
    # init --from the pair continues both towers (DIR/init.safetensors and DIR/generator/init.safetensors)
    r = invoke("init", tmp_path / "c", "--from", b)
    assert r.exit_code == 0, r.output
    from mlmtool.models import load_model

    loaded = load_model(ModelDir(b).read_config())
    again, before = loaded.load_hf(tmp_path / "c" / "init.safetensors"), loaded.load_hf(b / "model.safetensors")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(again),
                                                    jax.tree_util.tree_leaves(before)))
    r = invoke("eval", b, "--json")
    assert r.exit_code == 0, r.output
    results = json.loads(r.output.strip().splitlines()[-1])
    assert 0.0 <= results["eval_rtd_accuracy"] <= 1.0 and results["eval_loss"] > 0
