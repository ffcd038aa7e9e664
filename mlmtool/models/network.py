"""The half of a family's network every family shares, written once: :class:`MaskedLMBase`
(the ``*ForMaskedLM`` wrapper: dtype, kernels, gradient checkpointing, scanned layers, the
input checks, the default masks, document attention's segment ids, the gather at the masked
slots) and :class:`SubModule` (what every layer of a family carries).

A family's ``<family>_flax.py`` subclasses :class:`MaskedLMBase`, creates its submodules in
``setup`` (with ``**self.kw``; ``self.remat`` and ``self.scan`` for its layer stack) and
writes two methods::

    encode(input_ids, attention_mask, token_type_ids, positions, deterministic) -> [B, L, H]
    logits(x [..., H]) -> float32 [..., V]

``encode`` gets ``attention_mask`` as :func:`mlmtool.models.layers.attention` takes it (the
bool key-padding mask, or int segment ids under document attention) and ``positions``
(None, or int [B, L] from 0 in each document: a family that supports document attention uses
them for its position embeddings or rotary tables).  ``logits`` is the MLM head and tied
decoder, run on the masked slots only when training.  This module imports jax.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from mlmtool.errors import ConfigError
from mlmtool.runtime.kernels import Kernels, select as select_kernels
from mlmtool.models.layers import REMAT_POLICIES, Dense, Dropout, gather_masked, normal_init, segment_positions


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"unknown gradient checkpointing policy {remat!r}",
                          hint=f"use one of {', '.join(REMAT_POLICIES)}")


def choose_kernels(kernels: Kernels | None, dtype, config) -> Kernels:
    """``kernels``, or ``mlmtool.runtime.kernels.select``'s choice for jax's backend, ``dtype`` and the head size."""
    return kernels or select_kernels(dtype=jnp.dtype(dtype).name, head_dim=config.head_dim)


class SubModule(nn.Module):
    """A layer of a family's network: the parsed config and how to compute (shared by all)."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()

    @property
    def kw(self) -> dict:
        """The attributes every submodule shares."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, kernels=self.kernels)

    def dense(self, features: int, name: str | None, *, use_bias: bool = True, kernel_init=None) -> Dense:
        """A Dense in the kernels' form; N(0, initializer_range) kernel by default (HF's init)."""
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=use_bias,
                     kernel_init=kernel_init or normal_init(self.config.initializer_range),
                     form=self.kernels.dense, name=name)

    def dropout_layer(self, rate: float) -> Dropout:
        return Dropout(rate, form=self.kernels.dropout)


class MaskedLMBase(nn.Module):
    """A family's encoder with its masked-language-model head (HF ``*ForMaskedLM``).

    ``kernels`` (None: ``mlmtool.runtime.kernels.select`` for jax's default backend and ``dtype``),
    ``remat`` (a REMAT_POLICIES key, checked when the module is made) and ``scan_layers``
    (None: scan exactly when ``remat`` is on) change how the network is computed, never the
    parameters or the function: checkpoints and exports are interchangeable."""

    config: Any
    dtype: Any = jnp.float32  # computation dtype (float32 or bfloat16)
    param_dtype: Any = jnp.float32  # master weights always float32
    kernels: Kernels | None = None
    remat: str = "none"
    scan_layers: bool | None = None

    #: the hint of the error for an input longer than ``config.max_sequence_length``
    length_hint: ClassVar[str] = "use shorter sequences or a model with more position embeddings"

    def __post_init__(self):
        check_remat(self.remat)
        super().__post_init__()

    @property
    def kw(self) -> dict:
        """What the family's submodules are made with (``SubModule``'s fields)."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernels=choose_kernels(self.kernels, self.dtype, self.config))

    @property
    def scan(self) -> bool:
        # Rematerialisation pays off under the scan: XLA's scheduler keeps one layer's
        # recomputation at a time there, while across unrolled layers it saved 7% of the
        # activation memory where the scan saved 78% (docs/benchmarks.md, "Memory").
        return self.remat != "none" if self.scan_layers is None else self.scan_layers

    def encode(self, input_ids, attention_mask, token_type_ids, positions, deterministic: bool):
        """The encoder: final hidden states [B, L, H] (module docstring)."""
        raise NotImplementedError

    def logits(self, x):
        """The MLM head and decoder: hidden states [..., H] -> float32 logits [..., V]."""
        raise NotImplementedError

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 deterministic: bool = True, masked_positions=None, segment_ids=None):
        """input_ids/attention_mask/token_type_ids int [B, L]. Returns float32 logits:
        [B, L, V] when masked_positions is None, else [G, P, V] at the int32 positions
        masked_positions [G, P] (see ``layers.gather_masked``: the head runs only there).
        Rows with fewer masks pad with any valid position and the caller weights those out
        of the loss.  Dropout uses the 'dropout' rng when deterministic=False.

        attention_mask defaults to all ones and token_type_ids to zeros, as in HF (a family
        without token types ignores them).  With the cuDNN attention kernel (bfloat16 on
        NVIDIA GPUs) padding must be on the right.

        segment_ids int [B, L] (document attention, ``layers.document_segments``; 0 and
        attention_mask's False are padding): each document packed in a row attends only to
        itself and its positions start over, so a row computes what each document alone would.
        """
        input_ids, attention_mask, token_type_ids, positions = self.prepare(input_ids, attention_mask,
                                                                            token_type_ids, segment_ids)
        x = self.encode(input_ids, attention_mask, token_type_ids, positions, deterministic)  # [B, L, H]
        if masked_positions is not None:
            x = gather_masked(x, masked_positions)  # [G, P, H]
        return self.logits(x)  # [B, L, V] or [G, P, V]

    def prepare(self, input_ids, attention_mask, token_type_ids, segment_ids):
        """The checks and defaults of ``__call__``: (input_ids, attention_mask as ``encode``
        takes it, token_type_ids, positions) (a family's other entry points use it too:
        ELECTRA's ``discriminate``)."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_sequence_length:
            raise ConfigError(
                f"sequence length {input_ids.shape[1]} exceeds the model's maximum "
                f"{cfg.max_sequence_length} (max_position_embeddings={cfg.max_position_embeddings})",
                hint=self.length_hint)
        attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None \
            else jnp.asarray(attention_mask).astype(bool)  # [B, L]
        token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        positions = None
        if segment_ids is not None:  # the encoder's mask becomes the segment ids (layers.attention)
            attention_mask = jnp.where(attention_mask, jnp.asarray(segment_ids, jnp.int32), 0)  # [B, L]
            positions = segment_positions(attention_mask)  # [B, L]: from 0 in each document
        return input_ids, attention_mask, token_type_ids, positions


def tied_logits(x, embedding, bias, dtype):
    """The decoder tied to the word embeddings: ``x @ E.T (+ bias)``, accumulated in float32:
    [..., H] x [V, H] -> float32 [..., V]."""
    logits = jnp.einsum("...h,vh->...v", x.astype(dtype), embedding.astype(dtype),
                        preferred_element_type=jnp.float32)
    return logits if bias is None else logits + bias.astype(jnp.float32)
