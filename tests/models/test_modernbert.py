"""What is peculiar to the ModernBERT family (mlmtool.models.modernbert, modernbert_flax).

tests/test_families.py runs every family's checks on its three tiny configs (v5 keys; every
bias on; the legacy keys hub configs carry, ``global_attn_every_n_layers``,
``global_rope_theta``, ``local_rope_theta``) under transformers' default attention; here:
parity under the eager attention on batches longer than the sliding window (and that a window
one key off is visible), how the legacy keys resolve, the scan over two layer kinds, the cuDNN
choice per layer, dropout, the initialisation, the refused configs, the presets, and the
pipeline end to end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.errors import ConfigError
from mlmtool.runtime.kernels import Kernels
from mlmtool.models import family_for, load_model
from mlmtool.models.modernbert import FAMILY, ModernBertConfig, layer_types_every
from tests.pipeline import invoke, write_corpus
from tests.test_families import padded_batch as families_padded_batch, perturbed

# fp32 vs PyTorch fp32 (eager and sdpa); measured max |delta| ~2e-6 with logits of O(3).
PARITY_TOL = 1e-4

LENGTH = 96  # longer than the window: a sliding layer's query sees 33 of the keys
_BASE = dict(model_type="modernbert", vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=96, max_position_embeddings=128, local_attention=32, pad_token_id=3,
             bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
CASES = {
    # transformers v5's keys; every bias on (the flags' non-default side).
    "v5": dict(_BASE, attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True,
               layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # A pre-v5 hub config: the pattern and thetas under their old names; other activations, no decoder bias.
    "legacy": dict(_BASE, global_attn_every_n_layers=2, global_rope_theta=5000.0, local_rope_theta=100.0,
                   hidden_activation="gelu_new", classifier_activation="silu", decoder_bias=False),
}


def fields(case: str, **changes) -> dict:
    return {**CASES[case], **changes}


def config(case: str, **changes) -> ModernBertConfig:
    return FAMILY.parse_config(fields(case, **changes))


def padded_batch(seed: int = 0, left: bool = False):
    """input_ids, attention_mask [B, LENGTH]: rows of 96, 70 and 20 tokens padded (pad id 3) at
    the end (or start), as the registry test pads."""
    return families_padded_batch(load_model(CASES["v5"]), left=left, seed=seed, lengths=(LENGTH, 70, 20),
                                 length=LENGTH)


@functools.lru_cache(maxsize=None)
def fresh_params(case: str):
    """The initial parameters of a CASES entry, built once per session (init compiles)."""
    return load_model(CASES[case]).init(0)


@functools.lru_cache(maxsize=None)
def random_params(case: str):
    return perturbed(fresh_params(case))


def module(hf: dict, **load_kw):
    """The network of config.json fields ``hf`` (``load_kw``: load_model's dtype, kernels, remat, scan_layers)."""
    return load_model(hf, **load_kw).module


@functools.lru_cache(maxsize=None)
def _jitted_apply(hf_json: str, load_kw: tuple):
    net = module(json.loads(hf_json), **dict(load_kw))
    return jax.jit(lambda params, input_ids, attention_mask: net.apply({"params": params}, input_ids, attention_mask))


def flax_logits(hf: dict, params, batch, *, load_kw=None):
    """Our logits (jitted once per config and load options: the unjitted network's op-by-op
    dispatch costs seconds on CPU)."""
    fn = _jitted_apply(json.dumps(hf, sort_keys=True), tuple(sorted((load_kw or {}).items())))
    return np.asarray(fn(params, *batch))


def on_tokens(a, b, attention_mask) -> float:
    return float(np.abs(a - b)[attention_mask == 1].max())


# --------------------------------------------------------------------------- torch helpers


@pytest.fixture(scope="module")
def torch_mod():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers

    transformers.logging.set_verbosity_error()
    return torch


def hf_model(case: str, attn_implementation: str = "eager", seed: int = 0):
    """transformers' ModernBertForMaskedLM of a CASES entry, every weight perturbed."""
    import torch
    from transformers import ModernBertConfig as HFConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    theirs = {k: v for k, v in CASES[case].items() if k != "model_type"}
    model = ModernBertForMaskedLM._from_config(HFConfig(**theirs), attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model, batch) -> np.ndarray:
    import torch

    input_ids, attention_mask = (torch.as_tensor(x, dtype=torch.long) for x in batch)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().numpy()


def build_tokenizer(directory, vocab_size: int):
    """A word-level fast tokenizer with ModernBERT's special tokens at our ids (pad 3), padded
    with filler words to the model's vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    words = "the cat sat on mat a dog ran in park sun is hot today".split()
    vocab = {w: i for i, w in enumerate(specials + words + [f"w{i}" for i in range(vocab_size - 19)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken(t, lstrip=t == "[MASK]", special=True) for t in specials])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]")
    assert fast.pad_token_id == 3 and len(fast) == vocab_size
    fast.save_pretrained(directory)
    return fast


# --------------------------------------------------------------------------- parity with HF


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_with_identical_logits(torch_mod, tmp_path, case):
    """transformers save_pretrained (eager attention) -> our loader -> the same logits at the
    real tokens, rows longer than the window padded on the right and on the left."""
    attn = "eager"
    model = hf_model(case, attn)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    ours_config = FAMILY.parse_config(saved)
    # The legacy keys resolve as transformers resolves them (its saved config has v5's keys).
    assert ours_config == config(case)
    if case == "legacy":
        assert ours_config.layer_types == ("full_attention", "sliding_attention") * 2
    loaded = load_model(saved)
    params = loaded.load_hf(tmp_path)
    for left in (False, True):
        batch = padded_batch(left=left)
        ours, theirs = flax_logits(saved, params, batch), torch_logits(model, batch)
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.abs(theirs).max() > 1.0  # the comparison is not trivially small
        assert on_tokens(ours, theirs, batch[1]) <= PARITY_TOL
    if case == "v5" and attn == "eager":
        # The window is HF's to the key: one more or one less key on each side is a visible difference.
        batch = padded_batch()
        theirs = torch_logits(model, batch)
        for window in (30, 34):
            other = flax_logits(fields(case, local_attention=window), params, batch)
            assert on_tokens(other, theirs, batch[1]) > 1e-3, window


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_the_tied_decoder_key_is_accepted_beside_the_embeddings():
    """A state dict that carries ``decoder.weight`` (older writers): read back, equal to what was written."""
    loaded = load_model(CASES["v5"])
    state = loaded.to_hf(random_params("v5"))
    assert "decoder.weight" not in state
    back = loaded.from_hf({**state, "decoder.weight": state["model.embeddings.tok_embeddings.weight"]})
    for a, b in zip(jax.tree_util.tree_leaves(random_params("v5")), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)


# --------------------------------------------------------------------------- model behaviour


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_remat_and_scan_give_the_same_logits_and_gradients():
    """Gradient checkpointing (which scans by default: layer 0 unrolled, layers 1..3, of both
    kinds, as a scan with the kind as scanned data) computes the unrolled network's function
    and gradients in less memory; checkpointing unrolled layers, its logits."""
    cfg = config("v5")
    params = random_params("v5")
    batch = padded_batch()
    weights = np.random.default_rng(0).normal(size=(3, LENGTH, cfg.vocab_size)).astype(np.float32) * batch[1][..., None]

    temp = {}

    def value_and_grad(**module_kw):
        model = module(CASES["v5"], **module_kw)
        fn = jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, *batch) * weights)))
        temp[module_kw.get("remat", "none")] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
        return fn(params)

    want, want_grads = value_and_grad()
    got, grads = value_and_grad(remat="full")
    assert temp["full"] < temp["none"], temp  # the memory it is for
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    unrolled = flax_logits(CASES["v5"], params, batch, load_kw=dict(remat="dots", scan_layers=False))
    assert on_tokens(unrolled, flax_logits(CASES["v5"], params, batch), batch[1]) <= 1e-5


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_cudnn_kernel_choice_computes_the_same(monkeypatch):
    """With the cuDNN kernels the full layers call cuDNN (here XLA stands in, with the same
    per-row key lengths) and the sliding layers XLA with the window: same logits, unrolled
    and in the scan (where lax.cond picks per layer)."""
    real = jax.nn.dot_product_attention
    calls = []

    def stand_in(q, k, v, *args, implementation=None, **kw):
        calls.append(implementation)
        return real(q, k, v, *args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    params = random_params("v5")
    batch = padded_batch()  # right padding, as cuDNN needs
    want = flax_logits(CASES["v5"], params, batch, load_kw=dict(kernels=Kernels(attention="xla")))
    for scan in (False, True):
        calls.clear()
        got = flax_logits(CASES["v5"], params, batch,
                          load_kw=dict(kernels=Kernels(attention="cudnn"), scan_layers=scan))
        assert "cudnn" in calls and "xla" in calls
        assert on_tokens(got, want, batch[1]) <= 1e-5


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_dropout_and_the_explicit_attention_path():
    dropping = fields("v5", embedding_dropout=0.1, mlp_dropout=0.1, attention_dropout=0.1)
    params = random_params("v5")
    batch = padded_batch()

    def runner(hf, deterministic):
        model = module(hf)
        fn = jax.jit(lambda p, key: model.apply({"params": p}, *batch, deterministic=deterministic,
                                                rngs={"dropout": key}))
        return lambda seed: np.asarray(fn(params, jax.random.PRNGKey(seed)))

    evaluate, train = runner(dropping, True), runner(dropping, False)
    eval_a = evaluate(0)
    np.testing.assert_array_equal(eval_a, evaluate(1))  # deterministic ignores the rng
    np.testing.assert_allclose(eval_a, flax_logits(CASES["v5"], params, batch), atol=1e-6)
    train_a, train_b = train(0), train(1)
    np.testing.assert_array_equal(train_a, train(0))  # same rng, same masks
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)
    # Attention spelled out (attention dropout on, at a rate that drops nothing): the window
    # and padding masks as the fused path's.
    spelled_out = runner(fields("v5", attention_dropout=1e-9), False)(0)
    np.testing.assert_allclose(spelled_out[batch[1] == 1], eval_a[batch[1] == 1], atol=1e-4)


def test_init_matches_hf_scheme():
    cfg = config("v5")
    params = fresh_params("v5")
    std, cutoff = 0.02, 2.0
    out_std = std / (2 * cfg.num_hidden_layers) ** 0.5
    # truncated at +-2 std: the sample std is 0.88 x the untruncated one
    checks = {("model", "embeddings", "tok_embeddings", "embedding"): std,
              ("model", "layers", "1", "attn", "Wqkv", "kernel"): std,
              ("model", "layers", "1", "mlp", "Wi", "kernel"): std,
              ("model", "layers", "1", "attn", "Wo", "kernel"): out_std,
              ("model", "layers", "2", "mlp", "Wo", "kernel"): out_std,
              ("head", "dense", "kernel"): out_std}
    for path, s in checks.items():
        x = np.asarray(functools.reduce(lambda t, k: t[k], path, params))
        assert np.abs(x).max() <= cutoff * s + 1e-7, path
        assert abs(x.std() / s - 0.880) < 0.03, (path, x.std() / s)
    layer = params["model"]["layers"]["1"]
    assert not np.any(layer["attn"]["Wqkv"]["bias"]) and np.all(layer["attn_norm"]["scale"] == 1)
    assert not np.any(params["decoder"]["bias"]) and not np.any(params["model"]["final_norm"]["bias"])
    assert "attn_norm" not in params["model"]["layers"]["0"]


# --------------------------------------------------------------------------- config


def test_config_resolves_keys_as_transformers(torch_mod):
    from transformers import AutoConfig

    variants = [
        {},
        {"global_attn_every_n_layers": 2, "global_rope_theta": 1234.0, "local_rope_theta": 55.0},
        {"layer_types": ["sliding_attention"] * 4, "global_attn_every_n_layers": 2},  # layer_types wins
        {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5.0}},
         "global_rope_theta": 7.0, "local_rope_theta": 3.0},  # rope_parameters wins where given
        {"sliding_window": 10},  # transformers' setter: local_attention = 20
    ]
    for extra in variants:
        raw = {**_BASE, **extra}
        theirs = AutoConfig.for_model("modernbert", **{k: v for k, v in raw.items() if k != "model_type"})
        assert FAMILY.parse_config(raw) == FAMILY.parse_config(theirs.to_dict()), extra
        parsed = FAMILY.parse_config(raw)
        assert list(parsed.layer_types) == theirs.layer_types
        assert parsed.local_attention == theirs.local_attention
        assert parsed.global_rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
        assert parsed.local_rope_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    # asdict round-trips (init's path)
    cfg = config("v5")
    assert FAMILY.parse_config(dataclasses.asdict(cfg)) == cfg == ModernBertConfig.from_dict(CASES["v5"])


@pytest.mark.parametrize("change, field", [
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.0}}},
     "rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}, "rope_parameters"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"head_dim": 8}, "head_dim"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"hidden_size": 60, "num_attention_heads": 4}, "odd"),
    ({"hidden_activation": "mish"}, "hidden_activation"),
    ({"mlp_bias": "no"}, "mlp_bias"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"pad_token_id": 300}, "pad_token_id"),
    ({"global_attn_every_n_layers": 0}, "global_attn_every_n_layers"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        FAMILY.parse_config({**_BASE, **change})


def test_presets_and_layer_count_overrides():
    from mlmtool.presets import build_config

    base = build_config("modernbert-base")
    assert (base["num_hidden_layers"], base["hidden_size"], base["intermediate_size"], base["vocab_size"]) == \
        (22, 768, 1152, 50368)
    assert base["layer_types"] == layer_types_every(22) and base["local_attention"] == 128
    large = build_config("modernbert-large")
    assert (large["num_hidden_layers"], large["hidden_size"], large["intermediate_size"],
            large["num_attention_heads"]) == (28, 1024, 2624, 16)
    # --set num_hidden_layers alone regenerates layer_types, as transformers does when it is not given
    assert build_config("modernbert-tiny", overrides=["num_hidden_layers=3"])["layer_types"] == layer_types_every(3)
    assert family_for("modernbert").tokenizer["modernbert"].specials.mask_lstrip


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
def test_pipeline_init_tokenizer_prepare_train_predict(tmp_path, torch_mod):
    """init --preset modernbert-tiny -> tokenizer -> prepare (1024-token blocks) -> a few
    training steps -> predict equals transformers' fill-mask pipeline on the export."""
    from transformers import AutoTokenizer, pipeline

    from tests.test_predict import _same

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=300)
    d = tmp_path / "m"
    # Narrower than the preset (CPU seconds); a wide initialisation so that the predictions
    # after 2 steps are far from uniform and their order is well defined.
    r = invoke("init", d, "--preset", "modernbert-tiny", "--set", "hidden_size=32", "--set", "intermediate_size=48",
               "--set", "initializer_range=0.5")
    assert r.exit_code == 0, r.output
    assert "ModernBERT recipe" in r.stdout and "--mlm-probability 0.3" in r.stdout
    r = invoke("tokenizer", d, corpus, "--vocab-size", 300)
    assert r.exit_code == 0, r.output
    cfg = json.loads((d / "config.json").read_text())
    assert [cfg[k] for k in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id")] == \
        [3, 1, 2, 1, 2]
    tok = AutoTokenizer.from_pretrained(str(d))
    assert (tok.mask_token, tok.pad_token_id, tok.cls_token_id) == ("[MASK]", 3, 1)
    assert tok("the king [MASK]")["input_ids"] == tok("the king[MASK]")["input_ids"]  # [MASK] takes its space
    r = invoke("prepare", d, corpus, "--max-seq-length", 1024, "--validation-split-percentage", 10)
    assert r.exit_code == 0, r.output
    r = invoke("train", d, "--max-steps", 2, "--per-device-train-batch-size", 2, "--learning-rate", 1e-3,
               "--logging-steps", 1)
    assert r.exit_code == 0, (r.output, r.exception)
    assert re.search(r"sequence length\s+1024\b", r.stdout), r.stdout
    texts = ["The king [MASK] good night.", "the [MASK] said to the [MASK] of this house"]
    r = invoke("predict", d, *texts, "--json", "-k", 4)
    assert r.exit_code == 0, r.output
    fill = pipeline("fill-mask", model=str(d), top_k=4, device="cpu")
    for text, got in zip(texts, json.loads(r.stdout)):
        _same(got, fill(text))


@pytest.mark.slow
def test_init_from_a_transformers_directory(torch_mod, tmp_path):
    """init --from a directory written by ModernBertForMaskedLM.save_pretrained (and a
    tokenizer): config, tokenizer and weights come over; the loaded model is the torch one."""
    from mlmtool.hf_weights import read_safetensors
    from mlmtool.modeldir import ModelDir

    src = tmp_path / "hf"
    model = hf_model("legacy")
    config_of_case = globals()["config"]("legacy")
    model.save_pretrained(src)
    build_tokenizer(src, model.config.vocab_size)
    # config.json as the hub's ModernBERT checkpoints carry it (written by transformers 4.48):
    # the legacy keys, and leftovers transformers ignores.
    (src / "config.json").write_text(json.dumps({
        **CASES["legacy"], "architectures": ["ModernBertForMaskedLM"], "position_embedding_type": "absolute",
        "reference_compile": True, "repad_logits_with_grad": False, "torch_dtype": "float32",
        "transformers_version": "4.48.0"}))
    d = tmp_path / "adapted"
    r = invoke("init", d, "--from", src)
    assert r.exit_code == 0, r.output
    assert "no 'mlmtool tokenizer' step" in r.stdout
    config = ModelDir(d).read_config()
    assert FAMILY.parse_config(config) == FAMILY.parse_config(model.config.to_dict()) == config_of_case
    assert config["layer_types"] == ["full_attention", "sliding_attention"] * 2  # in v5's keys now
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ours = read_safetensors(d / "init.safetensors")
    assert set(theirs) - set(ours) == {"decoder.weight"}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)
    loaded = load_model(config)
    batch = padded_batch(seed=5)
    assert on_tokens(flax_logits(config, loaded.load_hf(d / "init.safetensors"), batch),
                     torch_logits(model, batch), batch[1]) <= PARITY_TOL
