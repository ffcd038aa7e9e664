"""Kernel choice per backend (mlmtool.runtime.kernels), gradient checkpointing and scanned layers:
each changes how the network is computed, never what it computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.runtime import kernels
from mlmtool.errors import ConfigError
from mlmtool.runtime.kernels import Kernels, select
from mlmtool.models import family_for, load_model
from mlmtool.presets import build_config

# -- selection -------------------------------------------------------------------------------


def test_cpu_keeps_the_cpu_tuned_kernels():
    assert select("cpu", dtype="float32", overrides="") == Kernels("xla", "flat", "fused-threefry")
    assert select("cpu", dtype="bfloat16", overrides="") == Kernels("xla", "flat", "fused-threefry")


@pytest.mark.parametrize("backend", ["gpu", "cuda"])
def test_nvidia_gpu_takes_cudnn_attention_where_it_runs(backend):
    assert select(backend, dtype="bfloat16", head_dim=64, overrides="").attention == "cudnn"
    assert select(backend, dtype="float16", head_dim=128, overrides="").attention == "cudnn"
    # cuDNN flash attention: 16-bit inputs, head_dim a multiple of 8 and at most 128
    assert select(backend, dtype="float32", head_dim=64, overrides="").attention == "xla"
    assert select(backend, dtype="bfloat16", head_dim=60, overrides="").attention == "xla"
    assert select(backend, dtype="bfloat16", head_dim=256, overrides="").attention == "xla"
    assert select(backend, dtype="bfloat16", head_dim=64, overrides="").dense == kernels.DEFAULTS["gpu"]["dense"]


def test_other_gpus_and_tpus_take_xla_attention():
    assert select("rocm", dtype="bfloat16", overrides="").attention == "xla"
    assert select("gpu", dtype="bfloat16", gpu_vendor="other", overrides="").attention == "xla"
    assert select("tpu", dtype="bfloat16", overrides="") == Kernels(**kernels.DEFAULTS["tpu"])


def test_overrides_from_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "dense=nd, dropout=jax")
    assert select("cpu") == Kernels("xla", "nd", "jax")
    monkeypatch.setenv(kernels.ENV, "attention=cudnn")  # cannot force cuDNN where it cannot run
    assert select("cpu").attention == "xla"
    monkeypatch.setenv(kernels.ENV, "attention=flash")
    with pytest.raises(ConfigError, match="attention=flash"):
        select("cpu")


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_the_model_selects_for_the_running_backend(monkeypatch):
    seen = {}

    def spy(backend=None, **kw):
        seen.update(kw, backend=backend)
        return Kernels()

    cfg = _config()
    head_dim = family_for(cfg["model_type"]).parse_config(cfg).head_dim
    monkeypatch.setattr("mlmtool.models.network.select_kernels", spy)  # where the network's kernels are chosen
    load_model(cfg, dtype="bfloat16").module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert seen == {"backend": None, "dtype": "bfloat16", "head_dim": head_dim}


# -- every path computes the same function -----------------------------------------------------


def _config(*overrides: str) -> dict:
    """config.json fields of the 'tiny' preset (vocabulary 300)."""
    return build_config("tiny", overrides=["vocab_size=300", *overrides])


def _batch(seed: int = 0, batch: int = 4, length: int = 24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 300, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # right padding, as every mlmtool path pads
    ids[1, 15:] = 1
    return ids, mask


ALL_CPU_KERNELS = [Kernels("xla", dense, dropout) for dense in ("flat", "nd") for dropout in ("fused-threefry", "jax")]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.1)])
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_every_kernel_gives_the_same_logits(dtype, tol):
    cfg = _config()
    params = load_model(cfg).init(0)
    ids, mask = _batch()
    reference = load_model(cfg).module.apply({"params": params}, ids, mask)  # float32, CPU kernels
    for k in ALL_CPU_KERNELS:
        out = load_model(cfg, dtype=dtype, kernels=k).module.apply({"params": params}, ids, mask)
        assert float(jnp.max(jnp.abs(out - reference))) <= tol, k


def test_dropout_kernels_keep_the_same_share_and_scale():
    x = jnp.ones((256, 512))
    for form in ("fused-threefry", "jax"):
        for key in (jax.random.PRNGKey(3), jax.random.key(3, impl="rbg")):
            from mlmtool.models.layers import Dropout

            y = Dropout(0.1, form=form).apply({}, x, False, rngs={"dropout": key})
            kept = np.asarray(y != 0)
            assert abs(kept.mean() - 0.9) < 0.005, (form, key)
            np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)


def _loss(model, params, ids, mask, key):
    logits = model.apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": key})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])


@pytest.mark.parametrize("scan,policies", [(False, ("none", "full")), (True, ("none", "dots", "full"))])
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_gradient_checkpointing_changes_memory_not_results(scan, policies):
    cfg = _config("num_hidden_layers=4")
    params = load_model(cfg).init(0)
    ids, mask = _batch(batch=8, length=64)
    key = jax.random.PRNGKey(1)
    grads, temp = {}, {}
    for remat in policies:
        model = load_model(cfg, remat=remat, scan_layers=scan).module
        fn = jax.jit(jax.value_and_grad(lambda p, i, m, k: _loss(model, p, i, m, k)))
        temp[remat] = fn.lower(params, ids, mask, key).compile().memory_analysis().temp_size_in_bytes
        grads[remat] = fn(params, ids, mask, key)
    for remat in policies[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                               grads[remat], grads["none"])
    if scan:  # under the scan XLA keeps one layer's recomputation at a time
        assert temp["full"] < 0.5 * temp["none"], temp
        assert temp["dots"] < temp["none"], temp


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_scanned_layers_compute_the_unrolled_network():
    cfg = _config("num_hidden_layers=3")
    params = load_model(cfg).init(0)
    ids, mask = _batch()
    unrolled = load_model(cfg, scan_layers=False).module.apply({"params": params}, ids, mask)
    scanned = load_model(cfg, scan_layers=True).module.apply({"params": params}, ids, mask)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)
    # the parameter tree is the unrolled one whatever the setting (checkpoints, export)
    tree = jax.eval_shape(lambda: load_model(cfg, scan_layers=True).module.init(jax.random.PRNGKey(0), ids))["params"]
    assert sorted(tree["encoder"]["layer"]) == ["0", "1", "2"]
    # training: the gradient is finite and the scan is what gradient checkpointing defaults to
    g = jax.grad(lambda p: _loss(load_model(cfg, remat="full").module, p, ids, mask, jax.random.PRNGKey(2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ConfigError, match="checkpointing policy"):
        load_model(_config(), remat="some").module.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def _nvidia_gpu() -> bool:
    return jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()


@pytest.mark.skipif(not _nvidia_gpu(), reason="cuDNN attention runs on NVIDIA GPUs only")
def test_cudnn_attention_matches_xla_on_the_gpu():
    """bf16, right-padded rows, forward and gradient: cuDNN's fused kernel against XLA's."""
    cfg = _config("hidden_size=256", "num_attention_heads=4", "attention_probs_dropout_prob=0.0")
    params = load_model(cfg).init(0)
    ids, mask = _batch(length=64)
    models = {a: load_model(cfg, dtype="bfloat16", kernels=Kernels(a, "nd", "jax")).module for a in ("cudnn", "xla")}
    logits = {a: m.apply({"params": params}, ids, mask) for a, m in models.items()}
    rel = float(jnp.linalg.norm(logits["cudnn"] - logits["xla"]) / jnp.linalg.norm(logits["xla"]))
    assert rel < 2e-2, rel
    key = jax.random.PRNGKey(1)
    grads = {a: jax.grad(lambda p, m=m: _loss(m, p, ids, mask, key))(params) for a, m in models.items()}
    for g_cudnn, g_xla in zip(jax.tree_util.tree_leaves(grads["cudnn"]), jax.tree_util.tree_leaves(grads["xla"])):
        scale = float(jnp.linalg.norm(g_xla)) or 1.0
        assert float(jnp.linalg.norm(g_cudnn - g_xla)) / scale < 5e-2
