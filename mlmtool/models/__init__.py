"""Model families: the registry, keyed by config.json's ``model_type``, and the one seam.

Train, eval, predict, ``init --from``, info and the benchmarks reach a network only through
:func:`load_model`, and a family's facts only through :func:`family_for`; adding a family is
one ``<family>.py`` (jax-free facts: a ``base.Family`` and a ``base.FamilyConfig``) plus one
``<family>_flax.py`` (its layers, under a ``network.MaskedLMBase``) in this package, listed
in ``FAMILY_MODULES``, and its tests.  A family is an architecture that transformers (v5)
has in PyTorch: the tests compare logits with it and the export is its ``*ForMaskedLM``
directory (no remote code is written).

Importing this package does not import jax: ``init``, ``tokenizer`` and ``--help`` stay fast.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import TYPE_CHECKING

from mlmtool.errors import ConfigError
from mlmtool.models.base import Family

if TYPE_CHECKING:
    from mlmtool.models.loaded import LoadedModel

#: The family modules, in the order ``--help`` lists their presets.
FAMILY_MODULES = ("bert", "modernbert", "distilbert", "albert", "roberta_prelayernorm", "roformer", "big_bird",
                  "electra")


@functools.cache
def families() -> dict[str, Family]:
    """Every family by name (``bert``, ...), importing their jax-free modules."""
    out = {}
    for name in FAMILY_MODULES:
        family = importlib.import_module(f"mlmtool.models.{name}").FAMILY
        out[family.name] = family
    return out


@functools.cache
def _by_model_type() -> dict[str, Family]:
    return {t: f for f in families().values() for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(_by_model_type())


def family_for(model_type) -> Family:
    """The family that implements ``model_type``; ConfigError naming the supported ones."""
    family = _by_model_type().get(model_type)
    if family is None:
        close = difflib.get_close_matches(str(model_type), supported_model_types(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of: {', '.join(supported_model_types())}"
        raise ConfigError(f"unsupported model_type {model_type!r}", hint)
    return family


@functools.cache
def all_presets() -> dict[str, dict]:
    """Every preset name (aliases included) -> its config.json fields."""
    out: dict[str, dict] = {}
    for family in families().values():
        out.update(family.presets)
        out.update({alias: family.presets[name] for alias, name in family.preset_aliases.items()})
    return out


def preset_help() -> dict[str, dict[str, str]]:
    """Family name -> {preset: help}, for ``init --help`` (aliases named in their target's line)."""
    out = {}
    for family in families().values():
        aliases = {}
        for alias, name in family.preset_aliases.items():
            aliases.setdefault(name, []).append(alias)
        out[family.name] = {name: text + (f" (alias: {', '.join(aliases[name])})" if name in aliases else "")
                            for name, text in family.preset_help.items()}
    return out


def tokenizer_help() -> str:
    """Each model_type's default tokenizer algorithm, for ``tokenizer --help`` ("bert → wordpiece, ...")."""
    return ", ".join(f"{t} → {d.algorithm}" for f in families().values() for t, d in f.tokenizer.items())


def document_attention_help() -> str:
    """The families whose ``train`` default is off / on, for ``--document-attention``'s help."""
    off = [f.name for f in families().values() if f.document_attention and not f.document_attention_default]
    on = [f.name for f in families().values() if f.document_attention and f.document_attention_default]
    return (f"off for {', '.join(off) or 'none'}" + (f"; on for {', '.join(on)}" if on else "")
            + "".join(f"; {f.name} has none" for f in families().values() if not f.document_attention))


def load_model(hf_config: dict, *, dtype: str = "float32", kernels=None, remat: str = "none",
               scan_layers: bool | None = None) -> "LoadedModel":
    """The network of a config.json dict, as one object: its family, its parsed config, the
    Flax module (computing in ``dtype``; ``kernels``/``remat``/``scan_layers`` change how,
    never what), and the Hugging Face weight conversion.  Imports jax."""
    from mlmtool.models.loaded import LoadedModel

    return LoadedModel.build(hf_config, dtype=dtype, kernels=kernels, remat=remat, scan_layers=scan_layers)
