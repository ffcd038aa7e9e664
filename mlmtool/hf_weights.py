"""Hugging Face weight format: ``model.safetensors`` in and out, no PyTorch needed.

Our parameter tree (see ``mlmtool.model``) mirrors the transformers ``state_dict`` names, so
the conversion is a table of renames; Dense kernels are stored ``[in, out]`` in Flax and
``[out, in]`` in ``torch.nn.Linear``, so they are transposed.

What transformers v5 (checked with 5.24) writes with ``save_pretrained`` and expects in
``from_pretrained`` for the masked-LM classes (``P`` = ``roberta`` or ``bert``)::

    P.embeddings.{word,position,token_type}_embeddings.weight
    P.embeddings.LayerNorm.{weight,bias}
    P.encoder.layer.<i>.attention.self.{query,key,value}.{weight,bias}
    P.encoder.layer.<i>.attention.output.dense.{weight,bias}
    P.encoder.layer.<i>.attention.output.LayerNorm.{weight,bias}
    P.encoder.layer.<i>.intermediate.dense.{weight,bias}
    P.encoder.layer.<i>.output.dense.{weight,bias}
    P.encoder.layer.<i>.output.LayerNorm.{weight,bias}
    RoBERTa head: lm_head.dense.{weight,bias}, lm_head.layer_norm.{weight,bias}, lm_head.bias
    BERT head:    cls.predictions.transform.dense.{weight,bias},
                  cls.predictions.transform.LayerNorm.{weight,bias}, cls.predictions.bias

The tied decoder (``lm_head.decoder.{weight,bias}`` / ``cls.predictions.decoder.{weight,bias}``)
is not written — it is the word-embedding table and the head bias — and no ``position_ids``
buffer and no pooler (the ``*ForMaskedLM`` classes build the encoder without one).  On input we
also accept what older checkpoints carry: the decoder copies (checked to equal what they are
tied to), ``position_ids``/``token_type_ids`` buffers, a pooler or BERT's next-sentence head
(ignored), and TF-era ``LayerNorm.gamma``/``beta`` names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

from mlmtool.errors import CheckpointError
from mlmtool.model import ModelConfig

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without format=pt

# Keys some checkpoints carry that a *ForMaskedLM model does not use.
_IGNORED = re.compile(
    r"^(roberta|bert)\.embeddings\.(position_ids|token_type_ids)$"  # non-persistent buffers
    r"|^(roberta|bert)\.pooler\."  # from *Model / *ForPreTraining checkpoints
    r"|^cls\.seq_relationship\."  # BERT's next-sentence-prediction head
)


class _Entry(NamedTuple):
    path: tuple[str, ...]  # key path in our params tree
    hf_key: str  # transformers state_dict key
    shape: tuple[int, ...]  # our (Flax) shape
    transpose: bool  # Dense kernel [in, out] <-> Linear weight [out, in]


def _hf_head(config: ModelConfig) -> dict[str, str]:
    if config.model_type == "roberta":
        return {"dense": "lm_head.dense", "layer_norm": "lm_head.layer_norm",
                "bias": "lm_head.bias", "decoder": "lm_head.decoder"}
    return {"dense": "cls.predictions.transform.dense",
            "layer_norm": "cls.predictions.transform.LayerNorm",
            "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"}


def _param_table(config: ModelConfig) -> list[_Entry]:
    """Every parameter: our path, the HF key, our shape, whether to transpose."""
    H, I = config.hidden_size, config.intermediate_size
    entries: list[_Entry] = []

    def dense(path, hf, n_in, n_out):
        entries.append(_Entry((*path, "kernel"), f"{hf}.weight", (n_in, n_out), True))
        entries.append(_Entry((*path, "bias"), f"{hf}.bias", (n_out,), False))

    def layer_norm(path, hf):
        entries.append(_Entry((*path, "scale"), f"{hf}.weight", (H,), False))
        entries.append(_Entry((*path, "bias"), f"{hf}.bias", (H,), False))

    base = config.model_type
    for name, rows in (("word_embeddings", config.vocab_size),
                       ("position_embeddings", config.max_position_embeddings),
                       ("token_type_embeddings", config.type_vocab_size)):
        entries.append(_Entry(("embeddings", name, "embedding"),
                              f"{base}.embeddings.{name}.weight", (rows, H), False))
    layer_norm(("embeddings", "LayerNorm"), f"{base}.embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        ours = ("encoder", "layer", str(i))
        hf = f"{base}.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            dense((*ours, "attention", "self", proj), f"{hf}.attention.self.{proj}", H, H)
        dense((*ours, "attention", "output", "dense"), f"{hf}.attention.output.dense", H, H)
        layer_norm((*ours, "attention", "output", "LayerNorm"), f"{hf}.attention.output.LayerNorm")
        dense((*ours, "intermediate", "dense"), f"{hf}.intermediate.dense", H, I)
        dense((*ours, "output", "dense"), f"{hf}.output.dense", I, H)
        layer_norm((*ours, "output", "LayerNorm"), f"{hf}.output.LayerNorm")
    head = _hf_head(config)
    dense(("lm_head", "dense"), head["dense"], H, H)
    layer_norm(("lm_head", "layer_norm"), head["layer_norm"])
    entries.append(_Entry(("lm_head", "bias"), head["bias"], (config.vocab_size,), False))
    return entries


def _modern_name(key: str) -> str:
    """TF-era ``LayerNorm.gamma``/``LayerNorm.beta`` -> ``weight``/``bias``, as transformers does."""
    return re.sub(r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight",
                  re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", key))


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if hasattr(tree, "items"):
        for key, value in tree.items():
            yield from _flatten(value, (*prefix, str(key)))
    else:
        yield prefix, tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _as_float32(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)  # also fetches jax arrays from the device
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
        raise CheckpointError(f"tensor {name} has dtype {array.dtype}, expected a float type")
    return array.astype(np.float32)


def to_hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> transformers ``*ForMaskedLM`` state dict (HF key names, PyTorch layouts, float32).

    ``params`` is the params tree (a ``{"params": ...}`` variables dict is accepted too); the
    arrays must be fully addressable from this process (gather sharded arrays first).
    """
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:
        params = params["params"]
    flat = dict(_flatten(params))
    table = _param_table(config)
    expected = {e.path for e in table}
    missing = expected - flat.keys()
    unexpected = flat.keys() - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + _describe("/".join(p) for p in missing))
        if unexpected:
            parts.append("unexpected " + _describe("/".join(p) for p in unexpected))
        raise CheckpointError(f"params do not match the {config.model_type} config: " + "; ".join(parts))

    state: dict[str, np.ndarray] = {}
    mismatched = []
    for entry in table:
        array = _as_float32(flat[entry.path], "/".join(entry.path))
        if array.shape != entry.shape:
            mismatched.append(f"{'/'.join(entry.path)} {array.shape} vs config {entry.shape}")
            continue
        state[entry.hf_key] = np.ascontiguousarray(array.T if entry.transpose else array)
    if mismatched:
        raise CheckpointError("params do not match the config: " + "; ".join(mismatched))
    return state


def from_hf_state_dict(state: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """transformers ``*ForMaskedLM`` state dict -> our params tree (host float32 numpy arrays).

    Accepts the key set transformers v5 ``save_pretrained`` writes plus the extras listed in the
    module docstring; raises CheckpointError naming missing keys, unexpected keys and shape
    mismatches.  ``jax.device_put`` the result with whatever sharding you need.
    """
    state = {_modern_name(k): v for k, v in state.items() if not _IGNORED.search(k)}

    head = _hf_head(config)
    word_key = f"{config.model_type}.embeddings.word_embeddings.weight"
    # The decoder is tied to (word embeddings, head bias).  Old checkpoints store the copies;
    # accept them when they really are copies, since our model cannot represent anything else.
    for tied_key, source_key in ((f"{head['decoder']}.weight", word_key),
                                 (f"{head['decoder']}.bias", head["bias"])):
        if tied_key not in state:
            continue
        copy = state.pop(tied_key)
        if source_key not in state:
            state[source_key] = copy
        elif not np.array_equal(np.asarray(copy), np.asarray(state[source_key])):
            raise CheckpointError(
                f"checkpoint has an untied {tied_key} that differs from {source_key}",
                hint="this model always ties the MLM decoder to the word embeddings",
            )

    table = _param_table(config)
    expected = {e.hf_key for e in table}
    missing = expected - state.keys()
    unexpected = state.keys() - expected
    problems = []
    if missing:
        problems.append("missing keys: " + _describe(missing))
    if unexpected:
        problems.append("unexpected keys: " + _describe(unexpected))
    mismatched = []
    for entry in table:
        if entry.hf_key not in state:
            continue
        shape = tuple(np.shape(state[entry.hf_key]))
        hf_shape = entry.shape[::-1] if entry.transpose else entry.shape
        if shape != hf_shape:
            mismatched.append(f"{entry.hf_key} {shape} vs config {hf_shape}")
    if mismatched:
        problems.append("shape mismatches: " + _describe(mismatched))
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the {config.model_type} config: " + "; ".join(problems)
        )

    params: dict = {}
    for entry in table:
        array = _as_float32(state[entry.hf_key], entry.hf_key)
        _set(params, entry.path, np.ascontiguousarray(array.T) if entry.transpose else array)
    return params


def save_safetensors(params, config: ModelConfig, path: str | os.PathLike) -> Path:
    """Write the HF ``model.safetensors`` atomically; ``path`` is the file or its directory.

    The file appears complete or not at all (``modeldir.atomic_write``: a temporary name in
    the same directory, flushed, renamed over ``path``, permissions from the umask).
    Returns the file's path.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    from mlmtool.modeldir import atomic_write

    path = Path(path)
    if path.is_dir():
        path = path / SAFETENSORS_NAME
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    state = to_hf_state_dict(params, config)
    try:
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=SAFETENSORS_METADATA))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write {path}: {e}") from None
    try:  # make the rename itself durable; not possible everywhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_dir():
        single, index = path / SAFETENSORS_NAME, path / SAFETENSORS_INDEX_NAME
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {index}: {e}") from None
            return [path / name for name in sorted(set(weight_map.values()))]
        raise CheckpointError(f"no {SAFETENSORS_NAME} in {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return [path]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file (or a model dir, sharded or not) as float/int numpy arrays.

    bfloat16 tensors (which plain numpy cannot hold) are returned as float32.
    """
    import jax
    from safetensors import SafetensorError, safe_open

    state: dict[str, np.ndarray] = {}
    for file in _safetensors_files(Path(path)):
        try:
            # The "flax" framework reads every dtype, bfloat16 included; keep it on the host.
            with jax.default_device(jax.local_devices(backend="cpu")[0]), safe_open(str(file), framework="flax") as f:
                for key in f.keys():
                    array = np.asarray(f.get_tensor(key))
                    state[key] = array.astype(np.float32) if array.dtype.name == "bfloat16" else array
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file not found: {file}") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: {e}", hint="the file is damaged or not safetensors") from None
    return state


def load_safetensors(path: str | os.PathLike, config: ModelConfig) -> dict:
    """Read an HF ``model.safetensors`` (file or model dir) into our params tree (float32 numpy)."""
    return from_hf_state_dict(read_safetensors(path), config)
