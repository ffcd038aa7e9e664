"""Sliding-window attention computed blockwise (mlmtool.models.local_attention) against the
dense [L, L] masked form, and the per-backend choice of its form (mlmtool.runtime.kernels)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmtool.runtime import kernels
from mlmtool.runtime.kernels import Kernels, select
from mlmtool.models.layers import windowed_attention
from mlmtool.models.local_attention import local_attention, worth_it

BLOCKWISE, DENSE = Kernels(local_attention="blockwise"), Kernels(local_attention="dense")


def _inputs(length: int, dtype=jnp.float32, segments: bool = False, seed: int = 0, heads: int = 2, dim: int = 16):
    """q, k, v [3, L, N, D] and the mask [3, L]: a full row, a row padded on the right from 2L/3,
    one padded from L/5; with ``segments`` integer ids of three documents per row (0 = padding)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, heads, dim)), dtype) for _ in range(3))
    real = np.ones((3, length), bool)
    real[1, 2 * length // 3:] = False
    real[2, length // 5:] = False
    if not segments:
        return q, k, v, jnp.asarray(real), real
    pos = np.arange(length)
    ids = 1 + (pos >= length // 3 - 5) + (pos >= length // 2 + 3)
    return q, k, v, jnp.asarray(np.where(real, ids, 0).astype(np.int32)), real


@functools.partial(jax.jit, static_argnums=(0, 1))
def _attend(kernel, half, q, k, v, mask):
    """The blockwise kernel itself (whatever the length), or the dense masked form (jitted:
    op-by-op dispatch is what would take the time here)."""
    if kernel == BLOCKWISE:
        return local_attention(q, k, v, mask, half=half)
    return windowed_attention(q, k, v, mask, half=half, kernels=kernel)


CASES = [(64, 32), (96, 32), (100, 34), (256, 64), (300, 96), (512, 128), (1024, 128), (1024, 32)]


@pytest.mark.parametrize("segments", [False, True], ids=["padding", "segments"])
@pytest.mark.parametrize("length,window", CASES)
def test_blockwise_equals_the_dense_masked_form(length, window, segments):
    q, k, v, mask, real = _inputs(length, segments=segments)
    half = window // 2
    dense = _attend(DENSE, half, q, k, v, mask)
    blockwise = _attend(BLOCKWISE, half, q, k, v, mask)
    # every real token; padding queries whose window is all padding are arbitrary (module docstring)
    np.testing.assert_allclose(np.asarray(blockwise)[real], np.asarray(dense)[real], atol=1e-5, rtol=0)
    # the window is the dense form's to the key: one key more on each side is a visible difference
    wider = _attend(DENSE, half + 1, q, k, v, mask)
    assert float(np.max(np.abs(np.asarray(wider)[real] - np.asarray(blockwise)[real]))) > 1e-3


@pytest.mark.parametrize("segments", [False, True], ids=["padding", "segments"])
@pytest.mark.parametrize("length,window", [(96, 32), (100, 34), (512, 128)])
def test_gradients_equal_the_dense_form(length, window, segments):
    q, k, v, mask, real = _inputs(length, segments=segments, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape) * real[:, :, None, None], jnp.float32)

    def grads(kernel):
        loss = lambda q, k, v: jnp.sum(_attend(kernel, window // 2, q, k, v, mask) * weights)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(BLOCKWISE), grads(DENSE)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length,window", [(96, 32), (512, 128), (1024, 64)])
def test_bfloat16_within_its_rounding(length, window):
    q, k, v, mask, real = _inputs(length, jnp.bfloat16, segments=True, seed=3)
    half = window // 2
    reference = np.asarray(_attend(DENSE, half, *(x.astype(jnp.float32) for x in (q, k, v)), mask))[real]
    blockwise = np.asarray(_attend(BLOCKWISE, half, q, k, v, mask).astype(jnp.float32))[real]
    dense = np.asarray(_attend(DENSE, half, q, k, v, mask).astype(jnp.float32))[real]
    # the blockwise form's bf16 error is the dense form's: same inputs, same float32 softmax
    err_blockwise, err_dense = np.max(np.abs(blockwise - reference)), np.max(np.abs(dense - reference))
    assert err_blockwise <= 2e-2 and err_blockwise <= 1.5 * err_dense + 1e-3, (err_blockwise, err_dense)


@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_short_rows_take_the_dense_form():
    """L below the window, one block, or spans as long as L: blockwise would not save anything,
    so the blockwise choice computes the dense form there (the kernel itself is right for them
    too: a single padded block)."""
    for length, window in ((50, 128), (64, 128), (40, 64), (64, 32)):
        assert not worth_it(length, window // 2)
        q, k, v, mask, real = _inputs(length)
        dense = np.asarray(_attend(DENSE, window // 2, q, k, v, mask))
        chosen = windowed_attention(q, k, v, mask, half=window // 2, kernels=BLOCKWISE)
        np.testing.assert_allclose(np.asarray(chosen), dense, atol=1e-6, rtol=0)  # all rows: the same form
        np.testing.assert_allclose(np.asarray(local_attention(q, k, v, mask, half=window // 2))[real], dense[real],
                                   atol=1e-5)
    assert worth_it(96, 16) and worth_it(512, 64) and worth_it(1024, 16)


def test_blockwise_computes_only_the_window():
    """At L 1024, window 128 the compiled forward and backward do a fraction of the dense FLOPs."""
    q, k, v, mask, _ = _inputs(1024)

    def flops(kernel):
        attend = lambda q, k, v: windowed_attention(q, k, v, mask, half=64, kernels=kernel)  # noqa: E731
        fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))
        analysis = fn.lower(q, k, v).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    assert flops(BLOCKWISE) < 0.3 * flops(DENSE)


def test_attention_dropout_in_the_blockwise_form():
    q, k, v, mask, real = _inputs(256, segments=True)
    no_drop = lambda p: p  # noqa: E731
    spelled = windowed_attention(q, k, v, mask, half=32, kernels=BLOCKWISE, dropout=no_drop)
    np.testing.assert_allclose(np.asarray(spelled)[real], np.asarray(_attend(DENSE, 32, q, k, v, mask))[real],
                               atol=1e-5)
    halved = windowed_attention(q, k, v, mask, half=32, kernels=BLOCKWISE, dropout=lambda p: p * 0.5)
    np.testing.assert_allclose(np.asarray(halved), 0.5 * np.asarray(spelled), atol=1e-6)


# -- the choice per backend ----------------------------------------------------------------------


def test_every_backend_defaults_to_blockwise_on_this_jax():
    assert not kernels.cudnn_takes_two_sided_window()  # jax 0.10's cuDNN path: a left window only
    for backend, dtype in (("cpu", "float32"), ("cpu", "bfloat16"), ("tpu", "bfloat16"), ("gpu", "bfloat16"),
                           ("gpu", "float32"), ("rocm", "bfloat16")):
        assert select(backend, dtype=dtype, overrides="").local_attention == "blockwise", (backend, dtype)
    assert select("cpu", overrides="local_attention=dense").local_attention == "dense"
    assert select("gpu", dtype="bfloat16", overrides="local_attention=cudnn").local_attention == "blockwise"


def test_cudnn_windows_where_jax_takes_them(monkeypatch):
    monkeypatch.setattr(kernels, "_TWO_SIDED", [True])
    assert select("gpu", dtype="bfloat16", overrides="").local_attention == "cudnn"
    assert select("gpu", dtype="float32", overrides="").local_attention == "blockwise"  # no cuDNN attention
    assert select("gpu", dtype="bfloat16", gpu_vendor="other", overrides="").local_attention == "blockwise"
    assert select("gpu", dtype="bfloat16", overrides="local_attention=blockwise").local_attention == "blockwise"
    assert select("cpu", overrides="local_attention=cudnn").local_attention == "blockwise"


def test_the_cudnn_window_form_computes_the_same(monkeypatch):
    """The cuDNN form passes a two-sided window and per-row key lengths; XLA stands in for cuDNN
    (it takes the same arguments).  Segment ids take the blockwise form."""
    real_attention = jax.nn.dot_product_attention
    calls = []

    def stand_in(q, k, v, *args, implementation=None, **kw):
        calls.append((implementation, kw.get("local_window_size")))
        return real_attention(q, k, v, *args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    cudnn = Kernels(attention="cudnn", local_attention="cudnn")
    for segments in (False, True):
        q, k, v, mask, real = _inputs(300, segments=segments)
        calls.clear()
        got = _attend(cudnn, 48, q, k, v, mask)
        assert calls == ([("xla", None)] if segments else [("cudnn", (48, 48))])
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(_attend(DENSE, 48, q, k, v, mask))[real],
                                   atol=1e-5)
