"""Hugging Face weight format: ``model.safetensors`` in and out, no PyTorch needed.

Each family's parameter tree mirrors the transformers ``state_dict`` names, so the conversion
is the family's table of renames (``mlmtool.models.base.WeightTable``, one per family); Dense
kernels are stored ``[in, out]`` in Flax and ``[out, in]`` in ``torch.nn.Linear``, so they are
transposed.  Tied copies (the MLM decoder) are not written; on input they are accepted when
they equal what they are tied to, as are the ignored keys and legacy names the table lists.

A table may span several models (ELECTRA's generator and discriminator): a key
``<part>/<key>`` belongs to the model in the subdirectory ``<part>`` beside the file
(``DIR/generator/model.safetensors`` for ``DIR/model.safetensors``), written and read with it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mlmtool.atomic import atomic_write
from mlmtool.errors import CheckpointError
from mlmtool.models.base import WeightTable

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses files without format=pt


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


def to_hf_state_dict(params, table: WeightTable, *, what: str = "model") -> dict[str, np.ndarray]:
    """Our params -> transformers ``*ForMaskedLM`` state dict (HF key names, PyTorch layouts, float32).

    ``params`` is the params tree (a ``{"params": ...}`` variables dict is accepted too); the
    arrays must be fully addressable from this process (gather sharded arrays first).
    """
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:
        params = params["params"]
    flat = dict(_flatten(params))
    expected = {e.path for e in table.entries}
    missing = expected - flat.keys()
    unexpected = flat.keys() - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + _describe("/".join(p) for p in missing))
        if unexpected:
            parts.append("unexpected " + _describe("/".join(p) for p in unexpected))
        raise CheckpointError(f"params do not match the {what} config: " + "; ".join(parts))

    state: dict[str, np.ndarray] = {}
    mismatched = []
    for entry in table.entries:
        array = _as_float32(flat[entry.path], "/".join(entry.path))
        if array.shape != entry.shape:
            mismatched.append(f"{'/'.join(entry.path)} {array.shape} vs config {entry.shape}")
            continue
        state[entry.hf_key] = np.ascontiguousarray(array.T if entry.transpose else array)
    if mismatched:
        raise CheckpointError("params do not match the config: " + "; ".join(mismatched))
    return state


def from_hf_state_dict(state: dict[str, np.ndarray], table: WeightTable, *, what: str = "model") -> dict:
    """transformers ``*ForMaskedLM`` state dict -> our params tree (host float32 numpy arrays).

    Accepts the key set transformers v5 ``save_pretrained`` writes plus the extras the table
    allows (tied copies, ignored keys, legacy names); raises CheckpointError naming missing
    keys, unexpected keys and shape mismatches.  ``jax.device_put`` the result with whatever
    sharding you need.
    """
    ignored = re.compile(table.ignored) if table.ignored else None
    state = {table.canonical(k): v for k, v in state.items() if not (ignored and ignored.search(k))}

    # Tied parameters (the decoder = word embeddings, head bias).  Old checkpoints store the
    # copies; accept them when they really are copies, since our model cannot represent anything else.
    for tied_key, source_key in table.tied:
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

    expected = {e.hf_key for e in table.entries}
    missing = expected - state.keys()
    unexpected = state.keys() - expected
    problems = []
    if missing:
        problems.append("missing keys: " + _describe(missing))
    if unexpected:
        problems.append("unexpected keys: " + _describe(unexpected))
    mismatched = []
    for entry in table.entries:
        if entry.hf_key not in state:
            continue
        shape = tuple(np.shape(state[entry.hf_key]))
        hf_shape = entry.shape[::-1] if entry.transpose else entry.shape
        if shape != hf_shape:
            mismatched.append(f"{entry.hf_key} {shape} vs config {hf_shape}")
    if mismatched:
        problems.append("shape mismatches: " + _describe(mismatched))
    if problems:
        raise CheckpointError(f"checkpoint does not match the {what} config: " + "; ".join(problems))

    params: dict = {}
    for entry in table.entries:
        array = _as_float32(state[entry.hf_key], entry.hf_key)
        _set(params, entry.path, np.ascontiguousarray(array.T) if entry.transpose else array)
    return params


def carried_tensors(table: WeightTable, paths) -> dict[str, np.ndarray]:
    """The tensors ``table.carried`` names (BERT's pooler), float32, from the first of
    ``paths`` (safetensors files: ``init --from``'s ``init.safetensors``, then an earlier
    ``model.safetensors``) that holds any; {} when none does.  Only those keys are read."""
    import jax
    from safetensors import SafetensorError, safe_open

    if not table.carried:
        return {}
    pattern = re.compile(table.carried)
    for path in paths:
        if not Path(path).is_file():
            continue
        try:
            with jax.default_device(jax.local_devices(backend="cpu")[0]), safe_open(str(path), framework="flax") as f:
                keys = [k for k in f.keys() if pattern.search(table.canonical(k))]
                if keys:
                    return {table.canonical(k): _as_float32(f.get_tensor(k), k) for k in keys}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}", hint="the file is damaged or not safetensors") from None
    return {}


def save_safetensors(params, table: WeightTable, path: str | os.PathLike, *, what: str = "model",
                     carried: dict[str, np.ndarray] | None = None) -> Path:
    """Write the HF ``model.safetensors`` atomically; ``path`` is the file or its directory;
    ``carried``: tensors written beside the parameters as they are (:func:`carried_tensors`).

    The file appears complete or not at all (``atomic.atomic_write``: a temporary name in
    the same directory, flushed, renamed over ``path``, permissions from the umask).
    Returns the file's path.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    path = Path(path)
    if path.is_dir():
        path = path / SAFETENSORS_NAME
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {path.parent} does not exist")
    state = to_hf_state_dict(params, table, what=what)
    state.update({k: np.ascontiguousarray(v) for k, v in (carried or {}).items()})
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        part, _, name = key.rpartition("/")
        parts.setdefault(part, {})[name] = array
    for part in sorted(parts, key=lambda p: p == ""):  # the main file last
        file = part_path(path, part)
        try:
            file.parent.mkdir(exist_ok=True)
            atomic_write(file, lambda tmp: save_file(parts[part], str(tmp), metadata=SAFETENSORS_METADATA))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"cannot write {file}: {e}") from None
    return path


def table_parts(table: WeightTable) -> tuple[str, ...]:
    """The parts (subdirectories) besides the main file that ``table``'s keys name."""
    return tuple(sorted({e.hf_key.rpartition("/")[0] for e in table.entries} - {""}))


def part_path(path: str | os.PathLike, part: str) -> Path:
    """Where part ``part`` of the weights at ``path`` (a file, or a model directory) lives."""
    path = Path(path)
    if not part:
        return path
    return path / part if path.is_dir() else path.parent / part / path.name


def read_parts(path: str | os.PathLike, parts: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """:func:`read_safetensors` of ``path`` and of each part beside it (keys ``<part>/<key>``)."""
    state = read_safetensors(path)
    for part in parts:
        state.update({f"{part}/{k}": v for k, v in read_safetensors(part_path(path, part)).items()})
    return state


def safetensors_files(path: Path) -> list[Path]:
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
    for file in safetensors_files(Path(path)):
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
