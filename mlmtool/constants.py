"""The choices and defaults the library and the command line share, declared once.

Imports nothing (no jax, no numpy), so the command line builds its options from these
tuples and numbers on the ``--help`` path; the library modules that use them (``optim``,
``masking``, ``train_config``, ``prepare``, ``evaluate``, ``minimal_pairs``) import them
from here, and :func:`choice_error` is the one wording of a refused choice.
"""

from __future__ import annotations

# -- choices (the first is the default where the option has one) --------------------------------
SCHEDULES = ("linear", "cosine", "constant", "wsd", "inverse_sqrt")  # --lr-scheduler (mlmtool.training.optim)
DECAY_SHAPES = ("1-sqrt", "linear", "cosine")                        # --decay-shape, wsd's (mlmtool.training.optim)
OPTIMIZERS = ("adamw", "adafactor", "lamb", "lion", "stable-adamw")  # --optimizer (mlmtool.training.optim)
MASKING_MODES = ("token", "whole-word", "span")                      # --masking (mlmtool.training.masking)
REMAT_POLICIES = ("none", "dots", "full")     # --gradient-checkpointing: the keys of models.layers.REMAT_POLICIES
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")                   # --prng-impl: jax's default first
DTYPES = ("float32", "bfloat16")                                     # --dtype: the computation dtype
PLL_MODES = ("word-l2r", "token")                                    # eval --pll (mlmtool.minimal_pairs)
EXECUTORS = ("local", "ray")                                         # prepare --executor

# -- defaults the library's functions and the command line's options share ---------------------
DEFAULT_MAX_SEQ_LENGTH = 128                 # prepare --max-seq-length: the seed notebook's
DEFAULT_VALIDATION_SPLIT_PERCENTAGE = 5.0    # prepare --validation-split-percentage
EVAL_MLM_PROBABILITY = 0.15  # eval's rate whatever the training one, so runs with other rates compare
DEFAULT_MIN_FREQUENCY = 2    # tokenizer --min-frequency
LATEST = "latest"            # --checkpoint: the newest checkpoint (else the export, else 'init --from' weights)


def choice_error(option: str, value, choices: tuple[str, ...]) -> str:
    """``--dtype must be float32 or bfloat16, got 'float16'``: a refused choice, worded once."""
    want = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    return f"{option} must be {want}, got {value!r}"
