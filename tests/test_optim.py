"""Schedules and optimizers (mlmtool.training.optim): values against their formulas, every optimizer
trains (with the family's weight-decay rule, which tests/test_families.py checks against HF's)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlmtool.models import load_model
from mlmtool.training.optim import OPTIMIZERS, decay_length, make_optimizer, make_schedule
from mlmtool.presets import build_config
from mlmtool.training.train_config import TrainConfig

LR = 2.0


def _lr(cfg: TrainConfig, total: int, warmup: int, steps) -> list[float]:
    schedule = make_schedule(cfg, total, warmup)
    return [float(schedule(s)) for s in steps]


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
def test_wsd(shape):
    cfg = TrainConfig(learning_rate=LR, lr_scheduler="wsd", decay_ratio=0.2, decay_shape=shape)
    assert decay_length(cfg, 100, 10) == 20
    decay = {"1-sqrt": lambda t: 1 - math.sqrt(t), "linear": lambda t: 1 - t,
             "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t))}[shape]
    steps = [0, 5, 10, 30, 79, 80, 85, 90, 99, 100]
    want = [0.0, LR / 2, LR, LR, LR, LR] + [LR * decay(t / 20) for t in (5, 10, 19, 20)]
    np.testing.assert_allclose(_lr(cfg, 100, 10, steps), want, rtol=1e-6, atol=1e-7)


def test_wsd_decay_steps_win_over_the_ratio_and_stay_inside_the_run():
    cfg = TrainConfig(learning_rate=LR, lr_scheduler="wsd", decay_steps=30, decay_shape="linear")
    assert decay_length(cfg, 100, 10) == 30
    np.testing.assert_allclose(_lr(cfg, 100, 10, [70, 85, 100]), [LR, LR / 2, 0.0], atol=1e-6)
    assert decay_length(TrainConfig(lr_scheduler="wsd", decay_steps=90), 100, 10) == 90
    # more decay steps than the run has: no stable phase, refused with the way on (issue 21)
    from mlmtool.errors import TrainingError

    with pytest.raises(TrainingError, match=r"--decay-steps 500 is longer than the run after its warm-up \(90 of"):
        decay_length(TrainConfig(lr_scheduler="wsd", decay_steps=500), 100, 10)


def test_inverse_sqrt():
    cfg = TrainConfig(learning_rate=LR, lr_scheduler="inverse_sqrt")
    np.testing.assert_allclose(_lr(cfg, 1000, 10, [5, 10, 40, 160]), [LR / 2, LR, LR / 2, LR / 4], rtol=1e-6)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.slow  # seconds of compiling or training: make test-fast leaves it out
def test_every_optimizer_trains(optimizer):
    """A tiny MLM on one fixed batch: 15 steps bring the loss down."""
    loaded = load_model(build_config("tiny", overrides=["vocab_size=64", "num_hidden_layers=1"]))
    model = loaded.module
    # Lion's sign updates want a smaller rate; LAMB's and Adafactor's steps are relative to
    # the weights' norm (small at initialisation) and want a larger one.
    lr = {"lion": 3e-4, "lamb": 3e-2, "adafactor": 3e-2}.get(optimizer, 3e-3)
    cfg = TrainConfig(optimizer=optimizer, learning_rate=lr, weight_decay=0.01)
    tx = make_optimizer(cfg, optax.constant_schedule(lr), loaded.decay_mask)
    params = loaded.init(0)
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 64, (8, 16)), jnp.int32)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state = tx.init(params)
    losses = []
    for _ in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(map(math.isfinite, losses)) and losses[-1] < 0.8 * losses[0], losses


def test_stable_adamw_clips_a_tensor_whose_gradient_outruns_its_second_moment():
    from mlmtool.training.optim import scale_by_stable_adam

    tx = scale_by_stable_adam(0.9, 0.999, 1e-8)
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.full(4, 0.01)}, state, params)  # a small gradient first
    clipped, _ = tx.update({"w": jnp.full(4, 100.0)}, state, params)  # then a huge one
    plain, _ = optax.scale_by_adam(0.9, 0.999, 1e-8).update({"w": jnp.full(4, 100.0)}, state.adam, params)
    ratio = float(plain["w"][0] / clipped["w"][0])
    # RMS(g^2 / v_hat) at step 2: v_hat = (0.001*1e-4 + 0.001*1e4)/(1-0.999^2) ~ 5e3, g^2 = 1e4
    assert ratio == pytest.approx(math.sqrt(1e4 / ((0.999 * 0.001 * 1e-4 + 0.001 * 1e4) / (1 - 0.999**2))), rel=1e-3)
    assert ratio > 1.3
