"""Learning-rate schedules and optimizers of the MLM recipes, built from optax pieces.

Schedules (``--lr-scheduler``), each after a linear warm-up from 0:

* ``linear``: to 0 at the last step (BERT, RoBERTa, ``run_mlm_flax.py``);
* ``cosine``: half a cosine to 0 (Loshchilov & Hutter 2017);
* ``constant``;
* ``wsd``: warmup-stable-decay, the peak held, then a decay to 0 over the last
  ``--decay-steps`` (or ``--decay-ratio`` of the run), ``linear``, ``cosine`` or ``1-sqrt``
  (``1 - sqrt(t)``, Hägele et al. 2024, arXiv:2405.18392, the shape ModernBERT decays with).
  The stable phase does not depend on the run's length, so the decay can be started later
  from any checkpoint;
* ``inverse_sqrt``: ``peak * sqrt(warmup / step)`` after the warm-up (Vaswani et al. 2017, fairseq).

Optimizers (``--optimizer``), each with weight decay off for biases and norm scales (the
parameters with fewer than two dimensions, as run_mlm_flax and nanoGPT exclude them):

* ``adamw`` (Loshchilov & Hutter 2019): RoBERTa's betas (0.9, 0.98);
* ``adafactor`` (Shazeer & Stern 2018): optax's defaults, factored second moments;
* ``lamb`` (You et al. 2019, arXiv:1904.00962): Adam's update scaled per tensor by the trust
  ratio ||w|| / ||update||, which lets BERT train with batches of 64k; as in NVIDIA's BERT
  recipe, neither the weight decay nor the trust ratio applies to biases and norm scales;
* ``lion`` (Chen et al. 2023, arXiv:2302.06675): the sign of an interpolated momentum; its
  updates are larger than Adam's, so it wants a 3-10x smaller learning rate and a 3-10x
  larger weight decay;
* ``stable-adamw`` (Wortsman et al. 2023, arXiv:2309.14322, as ModernBERT trains): AdamW
  whose step for each tensor is divided by ``max(1, RMS(g^2 / v))``, AdaFactor's update
  clipping, which keeps a tensor from taking a step its second-moment estimate has not seen.

``--max-grad-norm`` clips the global gradient norm before any of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mlmtool.constants import DECAY_SHAPES, OPTIMIZERS, SCHEDULES  # noqa: F401 (its choices, declared there)


# -- schedules ---------------------------------------------------------------------------------

def decay_length(cfg, total_steps: int, warmup_steps: int) -> int:
    """Steps of the WSD decay: ``--decay-steps``, else ``--decay-ratio`` of the run (at least 1)."""
    steps = cfg.decay_steps if cfg.decay_steps > 0 else round(cfg.decay_ratio * total_steps)
    if cfg.decay_steps > max(total_steps - warmup_steps, 1):  # else the whole run decays, with no word
        from mlmtool.errors import TrainingError

        raise TrainingError(f"--decay-steps {cfg.decay_steps} is longer than the run after its warm-up "
                            f"({total_steps - warmup_steps} of {total_steps} steps): wsd would have no stable phase",
                            f"give --decay-steps {max(total_steps - warmup_steps, 1)} or fewer, or --decay-ratio "
                            "(1 decays the whole run)")
    return max(1, min(steps, total_steps - warmup_steps))


def _decay(shape: str, peak: float, steps: int) -> optax.Schedule:
    """``peak`` to 0 over ``steps`` steps in the given shape."""
    if shape == "linear":
        return optax.linear_schedule(peak, 0.0, steps)
    if shape == "cosine":
        return optax.cosine_decay_schedule(peak, steps)
    return lambda count: peak * (1.0 - jnp.sqrt(jnp.clip(count / steps, 0.0, 1.0)))  # 1-sqrt


def make_schedule(cfg, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The learning rate at each optimizer step (see the module docstring)."""
    lr = cfg.learning_rate
    after_warmup = max(total_steps - warmup_steps, 1)
    if cfg.lr_scheduler == "linear":
        after = optax.linear_schedule(lr, 0.0, after_warmup)
    elif cfg.lr_scheduler == "cosine":
        after = optax.cosine_decay_schedule(lr, after_warmup)
    elif cfg.lr_scheduler == "wsd":
        decay = decay_length(cfg, total_steps, warmup_steps)
        stable = after_warmup - decay
        after = optax.join_schedules([optax.constant_schedule(lr), _decay(cfg.decay_shape, lr, decay)], [stable])
    elif cfg.lr_scheduler == "inverse_sqrt":
        w = max(warmup_steps, 1)
        after = lambda count: lr * jnp.sqrt(w / (count + w))  # noqa: E731  (count counts from the warm-up's end)
    else:
        after = optax.constant_schedule(lr)
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


# -- optimizers --------------------------------------------------------------------------------

class StableAdamState(NamedTuple):
    adam: optax.ScaleByAdamState


def scale_by_stable_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's update divided, per tensor, by ``max(1, sqrt(mean(g^2 / v_hat)))``: StableAdamW's
    update clipping (Wortsman et al. 2023), with ``v_hat`` the bias-corrected second moment
    after this step's gradient."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init(params):
        return StableAdamState(adam.init(params))

    def update(grads, state, params=None):
        updates, adam_state = adam.update(grads, state.adam, params)
        correction = 1.0 - b2 ** adam_state.count.astype(jnp.float32)

        def clip(u, g, nu):
            rms = jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(nu / correction, eps ** 2)))
            return u / jnp.maximum(1.0, rms)

        return jax.tree_util.tree_map(clip, updates, grads, adam_state.nu), StableAdamState(adam_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, schedule: optax.Schedule, decay_mask: Callable[[Any], Any]) -> optax.GradientTransformation:
    """``cfg.optimizer`` with ``cfg``'s betas, epsilon and weight decay, after global-norm clipping;
    ``decay_mask`` (params -> tree of bools) is the family's no-weight-decay rule
    (``LoadedModel.decay_mask``, HF Trainer's: tested in tests/test_families.py).

    With a time budget (``cfg.max_time``) the learning rate is not a schedule of the
    optimizer's step count but a hyperparameter the training step sets from the elapsed
    time (``optax.inject_hyperparams``; see ``step.train_step``'s ``clock``)."""
    if getattr(cfg, "max_time", 0) > 0:
        return optax.inject_hyperparams(lambda learning_rate: _optimizer(cfg, learning_rate, decay_mask))(
            learning_rate=cfg.learning_rate)
    return _optimizer(cfg, schedule, decay_mask)


def _optimizer(cfg, schedule, decay_mask) -> optax.GradientTransformation:
    b1, b2, eps, wd = cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay
    name = cfg.optimizer
    if name == "adafactor":
        opt = optax.adafactor(learning_rate=schedule)
    elif name == "lamb":
        opt = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                          optax.masked(optax.add_decayed_weights(wd), decay_mask),
                          optax.masked(optax.scale_by_trust_ratio(), decay_mask),
                          optax.scale_by_learning_rate(schedule))
    elif name == "lion":
        opt = optax.lion(schedule, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
    elif name == "stable-adamw":
        opt = optax.chain(scale_by_stable_adam(b1, b2, eps), optax.add_decayed_weights(wd, decay_mask),
                          optax.scale_by_learning_rate(schedule))
    else:
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt
