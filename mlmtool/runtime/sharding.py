"""Devices, the mesh and shardings (``jax.sharding``, not ``pmap``), MaxText-style.

- The device mesh has two named axes, ``data`` and ``fsdp``.  The batch is split over
  both (every device holds different rows); parameters and optimizer state are split
  over ``fsdp`` only (fully-sharded data parallelism, ZeRO-3 style), so ``fsdp=1`` is
  plain data parallelism with replicated parameters.
- Which dimension of a parameter is split is a fact of the family's weight table: each
  dimension has a logical name (``WeightEntry.axes``: "vocab", "embed", "mlp", ...) and
  :data:`RULES` maps the names to mesh axes (MaxText's ``logical_axis_rules``).  The layout
  is not stored in checkpoints: orbax restores into whatever layout the rules give.
- Each process reads only the rows of the global batch that its own devices hold and
  assembles the global array with ``jax.make_array_from_process_local_data``: this is
  what run_mlm_flax gets wrong on multi-host TPU pods (transformers #16470, #20252).

Joining a multi-process run and the collectives (``agree``) are :mod:`mlmtool.runtime.distributed`'s.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlmtool.errors import TrainingError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=-1,fsdp=2"`` → {"data": n/2, "fsdp": 2}; one axis may be -1 (the rest)."""
    sizes = {"data": -1, "fsdp": 1}
    if spec:
        sizes = {"data": 1, "fsdp": 1}
        for part in spec.split(","):
            if "=" not in part:
                raise TrainingError(f"--mesh {spec!r}: {part!r} is not axis=size", "e.g. --mesh data=-1,fsdp=2")
            name, value = (s.strip() for s in part.split("=", 1))
            if name not in AXES:
                raise TrainingError(f"--mesh: unknown axis {name!r}", f"axes are {', '.join(AXES)}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise TrainingError(f"--mesh {name}={value!r} is not an integer",
                                    "e.g. --mesh data=-1,fsdp=2") from None
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise TrainingError("--mesh: at most one axis may be -1", "e.g. --mesh data=-1,fsdp=2")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if unknown:
        if known <= 0 or n_devices % known:
            raise TrainingError(f"--mesh {spec}: {n_devices} devices are not divisible by {known}",
                                "choose axis sizes that divide the device count")
        sizes[unknown[0]] = n_devices // known
    if int(np.prod(list(sizes.values()))) != n_devices:
        raise TrainingError(f"--mesh {spec}: {sizes} does not use exactly the {n_devices} devices",
                            "make the product of the axis sizes equal the device count (or use -1)")
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((sizes["data"], sizes["fsdp"]), devices=devices,
                                             allow_split_physical_axes=True)
    except Exception:
        grid = np.asarray(devices).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Rows split over every device; ``leading_dims`` unsplit axes before the row axis."""
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


#: Logical axis -> mesh axis (MaxText's ``logical_axis_rules``, flax's ``logical_to_mesh_axes``):
#: every dimension of every parameter is named in the family's weight table
#: (``WeightEntry.axes``), and this table says which mesh axis a dimension of that name may be
#: split over (None: never).  A mesh axis splits one dimension of a parameter: of the dimensions
#: it may split, the largest whose size it divides (the first of equal ones), so every matrix is
#: split over its larger side (embedding tables over their rows) and each device holds 1/fsdp
#: of it.  LayerNorm vectors, token-type rows, one head's width and a one-column head are never
#: split: tiny, and read whole by every device.
RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "fsdp"),       # vocabulary rows: word embeddings, the MLM head's bias
    ("mlp", "fsdp"),         # the feed-forward width (intermediate_size; ModernBERT's GLU: 2x)
    ("heads", "fsdp"),       # the attention projections' width (heads x head_dim; fused q,k,v: 3x)
    ("embed", "fsdp"),       # the residual stream (hidden_size)
    ("embedding", "fsdp"),   # the embedding tables' width (embedding_size: ALBERT, ELECTRA, RoFormer)
    ("positions", "fsdp"),   # position-embedding rows (max_position_embeddings)
    ("types", None),         # token-type rows (type_vocab_size: 1 or 2)
    ("kv", None),            # one head's width (RoFormer's sinusoidal table)
    ("classes", None),       # a classifier's outputs (ELECTRA's discriminator: 1)
    ("norm", None),          # LayerNorm scale and bias
)
_RULE = dict(RULES)
_TABLE_BUG = "a bug in the family's weight table (mlmtool/models/): every parameter's dimensions are named there"


def logical_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh_shape: dict[str, int]) -> P:
    """The PartitionSpec of a parameter with logical ``axes`` and ``shape`` on a mesh of
    ``mesh_shape`` sizes, by :data:`RULES`: each mesh axis of size > 1 on the largest dimension
    that the rules let it split and whose size it divides; a parameter with none stays
    replicated.  No jax devices needed (the tests lay out published sizes on meshes this
    machine does not have)."""
    if len(axes) != len(shape):
        raise TrainingError(f"logical axes {axes} do not name the {len(shape)} dimensions of shape {shape}",
                            _TABLE_BUG)
    unknown = [a for a in axes if a not in _RULE]
    if unknown:
        raise TrainingError(f"logical axes {unknown} are not in sharding.RULES ({', '.join(_RULE)})", _TABLE_BUG)
    spec: list[str | None] = [None] * len(shape)
    for mesh_axis in dict.fromkeys(m for _, m in RULES if m):
        size = mesh_shape.get(mesh_axis, 1)
        fits = [d for d, a in enumerate(axes) if _RULE[a] == mesh_axis and spec[d] is None and shape[d] % size == 0]
        if size > 1 and fits:
            spec[max(fits, key=lambda d: (shape[d], -d))] = mesh_axis
    return P(*spec) if any(spec) else P()  # replicated: P(), as jax writes it


def _dict_path(key_path) -> tuple[str, ...]:
    """The dictionary keys of a pytree key path: a parameter's path, inside the optimizer state too."""
    return tuple(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _leaf_axes(path: tuple[str, ...], shape: tuple[int, ...], param_axes: dict) -> tuple[str, ...] | None:
    """The logical axes of a leaf whose key path ends in a parameter's path: the parameter's own
    (its value, Adam's moments), or with one dimension dropped (Adafactor's factored second
    moments, the parameter's shape less one dimension); None for anything else."""
    for start in range(len(path)):
        entry = param_axes.get(path[start:])
        if entry is None:
            continue
        axes, param_shape = entry
        if tuple(shape) == tuple(param_shape):
            return axes
        for d in range(len(param_shape)):
            if tuple(shape) == tuple(param_shape[:d]) + tuple(param_shape[d + 1:]):
                return axes[:d] + axes[d + 1:]
        return None
    return None


def state_specs(tree: Any, param_axes: dict, mesh_shape: dict[str, int]) -> Any:
    """PartitionSpecs for a pytree of arrays/ShapeDtypeStructs (parameters or optimizer state)
    from the weight table's logical axes (``param_axes``: parameter path -> (axes, shape),
    ``LoadedModel.param_axes``).  Leaves that follow a parameter (its value, its moments) are
    laid out by :func:`logical_spec`; scalars and placeholders (step counts, injected
    hyperparameters, Adafactor's unfactored [1] slots) are replicated.  ValueError for any other
    leaf of more than one element: a parameter the weight table does not name."""
    def spec(key_path, x):
        shape = tuple(x.shape)
        path = _dict_path(key_path)
        axes = _leaf_axes(path, shape, param_axes)
        if axes is not None:
            return logical_spec(axes, shape, mesh_shape)
        if int(np.prod(shape, dtype=np.int64)) <= 1:
            return P()
        raise TrainingError(f"{jax.tree_util.keystr(key_path)} {shape} has no logical axes: the family's "
                            "weight table does not list it", _TABLE_BUG)

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(mesh: Mesh, abstract_tree: Any, param_axes: dict) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state): see
    :func:`state_specs`."""
    specs = state_specs(abstract_tree, param_axes, dict(mesh.shape))
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], row_axis: int = 0) -> np.ndarray:
    """Indices along ``row_axis`` that this process's devices hold, in ascending order."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        sl = index[row_axis]
        rows.update(range(*sl.indices(global_shape[row_axis])))
    return np.asarray(sorted(rows), dtype=np.int64)


def global_array(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """Assemble a global array from this process's rows (see :func:`process_rows`)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def device_summary() -> dict:
    devs = jax.devices()
    return {
        "devices": len(devs),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
    }


def is_main_process() -> bool:
    return jax.process_index() == 0
