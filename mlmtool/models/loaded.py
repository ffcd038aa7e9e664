"""The seam: a config.json dict -> one object holding the network and everything that goes
with it (``mlmtool.models.load_model``).  This module imports jax."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlmtool import hf_weights
from mlmtool.errors import ConfigError
from mlmtool.runtime.kernels import Kernels
from mlmtool.models import family_for
from mlmtool.models.base import Family, WeightTable
from mlmtool.models.network import choose_kernels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def network_class(family: Family):
    module, _, name = family.network.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A family's network for one config.

    ``module`` is the Flax module train/eval/predict apply::

        logits = loaded.module.apply({"params": params}, input_ids, attention_mask,
                                     deterministic=True, masked_positions=None)

    float32 logits [B, L, V] (or [G, P, V] at ``masked_positions`` [G, P]).  Parameters are
    always float32; ``dtype`` is the computation dtype.
    """

    family: Family
    config: Any                  # the family's parsed config (frozen dataclass)
    hf_config: dict              # config.json as read
    module: Any                  # flax.linen.Module
    dtype: str = "float32"

    @classmethod
    def build(cls, hf_config: dict, *, dtype: str = "float32", kernels: Kernels | None = None,
              remat: str = "none", scan_layers: bool | None = None) -> "LoadedModel":
        if not isinstance(hf_config, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(hf_config).__name__}")
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
        family = family_for(hf_config.get("model_type"))
        config = family.parse_config(hf_config)
        # the network checks remat; its kernels are fixed here, for the run's description
        module = network_class(family)(config, dtype=DTYPES[dtype], remat=remat, scan_layers=scan_layers,
                                       kernels=choose_kernels(kernels, DTYPES[dtype], config))
        return cls(family=family, config=config, hf_config=hf_config, module=module, dtype=dtype)

    # -- parameters ---------------------------------------------------------------------------

    def _init_variables(self, rng):
        # The plain float32 network: the parameters do not depend on dtype, kernels or remat.
        # A [1, 2] dummy batch is enough: no parameter shape depends on the sequence length.
        return network_class(self.family)(self.config).init(rng, jnp.zeros((1, 2), jnp.int32))

    def init(self, rng) -> dict:
        """Fresh float32 parameters initialised like HF's ``_init_weights``; ``rng`` is a
        ``jax.random`` key or an int seed.  Returns the contents of the "params" collection."""
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.PRNGKey(int(rng))
        return jax.jit(self._init_variables)(rng)["params"]

    @functools.cached_property
    def abstract_params(self) -> dict:
        """The parameter tree as ShapeDtypeStructs (nothing allocated)."""
        return jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))["params"]

    @functools.cached_property
    def param_axes(self) -> dict[tuple[str, ...], tuple[tuple[str, ...], tuple[int, ...]]]:
        """Parameter path -> (logical axes, shape), from the family's weight table: what
        ``sharding.state_shardings`` lays parameters and optimizer state out by."""
        return {e.path: (e.axes, e.shape) for e in self.weight_table.entries}

    @property
    def parameter_count(self) -> int:
        return self.family.parameter_count(self.hf_config)

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_sequence_length

    def decay_mask(self, params) -> Any:
        """A tree of bools like ``params``: True where weight decay applies (the family's rule)."""
        paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        return jax.tree_util.tree_unflatten(treedef, [
            not self.family.no_weight_decay(tuple(str(getattr(k, "key", k)) for k in path), np.shape(leaf))
            for path, leaf in paths])

    # -- Hugging Face weights -----------------------------------------------------------------

    @functools.cached_property
    def weight_table(self) -> WeightTable:
        return self.family.weight_table(self.config)

    def to_hf(self, params) -> dict[str, np.ndarray]:
        return hf_weights.to_hf_state_dict(params, self.weight_table, what=self.config.model_type)

    def from_hf(self, state: dict) -> dict:
        return hf_weights.from_hf_state_dict(state, self.weight_table, what=self.config.model_type)

    def save_hf(self, params, path: str | os.PathLike, *, carry_from=(), carried: dict | None = None) -> Path:
        """Write ``model.safetensors`` (atomically) that transformers loads, with the tensors
        the family carries unchanged (BERT's imported pooler): ``carried``, or those of the
        first of the files ``carry_from`` that holds any (``hf_weights.carried_tensors``)."""
        if carried is None:
            carried = hf_weights.carried_tensors(self.weight_table, carry_from)
        return hf_weights.save_safetensors(params, self.weight_table, path, what=self.config.model_type,
                                           carried=carried)

    def load_hf(self, path: str | os.PathLike) -> dict:
        """A ``model.safetensors`` (file or HF model dir) -> our params tree (host float32)."""
        return self.from_hf(hf_weights.read_parts(path, hf_weights.table_parts(self.weight_table)))
