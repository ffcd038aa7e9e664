"""Test shorthands over the model seam for a parsed family config (e.g. ``BertConfig``):
build its network, initialise it, convert its weights, without writing a config.json."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mlmtool import hf_weights
from mlmtool.models import family_for, load_model
from mlmtool.models.bert import BertConfig as ModelConfig  # noqa: F401 (re-exported for the tests)


def hf_dict(config) -> dict:
    """The config.json fields of a parsed family config."""
    return dataclasses.asdict(config)


def loaded(config, **kw):
    return load_model(hf_dict(config), **kw)


def MaskedLM(config, **kw):  # noqa: N802 (reads like the class it builds)
    """The family's Flax network for ``config`` (kw: dtype, kernels, remat, scan_layers)."""
    from mlmtool.models.loaded import network_class

    return network_class(family_for(config.model_type))(config, **kw)


def init_params(config, rng) -> dict:
    return loaded(config).init(rng)


def count_params(config) -> int:
    shapes = loaded(config).abstract_params
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(shapes)))


def table(config):
    return family_for(config.model_type).weight_table(config)


def to_hf_state_dict(params, config):
    return hf_weights.to_hf_state_dict(params, table(config), what=config.model_type)


def from_hf_state_dict(state, config):
    return hf_weights.from_hf_state_dict(state, table(config), what=config.model_type)


def save_safetensors(params, config, path):
    return hf_weights.save_safetensors(params, table(config), path, what=config.model_type)


def load_safetensors(path, config):
    return from_hf_state_dict(hf_weights.read_safetensors(path), config)
