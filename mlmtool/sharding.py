"""Devices, the mesh and shardings (``jax.sharding``, not ``pmap``), MaxText-style.

- The device mesh has two named axes, ``data`` and ``fsdp``.  The batch is split over
  both (every device holds different rows); parameters and optimizer state are split
  over ``fsdp`` only (fully-sharded data parallelism, ZeRO-3 style), so ``fsdp=1`` is
  plain data parallelism with replicated parameters.
- Each process reads only the rows of the global batch that its own devices hold and
  assembles the global array with ``jax.make_array_from_process_local_data``: this is
  what run_mlm_flax gets wrong on multi-host TPU pods (transformers #16470, #20252).

Joining a multi-process run and the collectives (``agree``) are :mod:`mlmtool.distributed`'s.
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


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Split the largest dimension divisible by the fsdp size; small tensors stay replicated.

    For this model that gives the usual FSDP layout: embedding tables split over the
    vocabulary/position rows, attention and MLP kernels over their larger side, and
    biases/LayerNorm vectors (tiny) split only when they divide evenly.
    """
    if fsdp == 1 or not shape:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0 and shape[d] >= fsdp:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs (params, optimizer state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp)), abstract_tree)


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
