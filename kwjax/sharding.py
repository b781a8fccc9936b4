"""Device mesh and partition rules: parameters over (fsdp, tensor), batches over (data, fsdp).

Axes: `data` (pure data parallel: parameters replicated), `fsdp` (batch split and parameters sharded,
gathered per layer by XLA), `tensor` (heads, MLP width and vocabulary split). An axis that does not
divide a dimension is dropped for that parameter (e.g. Gemma's single KV head stays unsplit), so every
mesh shape works for every model size.
"""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the "/"-joined parameter path, spec per dimension), first match wins.
RULES: list[tuple[str, tuple]] = [
    (r"^embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"attn/q$", ("fsdp", "tensor", None)),  # [D, N, H]
    (r"attn/(k|v)$", ("fsdp", "tensor", None)),  # [D, K, H]
    (r"attn/o$", ("tensor", None, "fsdp")),  # [N, H, D]
    (r"mlp/(gate|up)$", ("fsdp", "tensor")),  # [D, F]
    (r"mlp/down$", ("tensor", "fsdp")),  # [F, D]
    (r"/a$", ("fsdp", None)),  # LoRA A [in, r] (kwjax.lora): its input side split like the weight's
    (r"/b$", (None, "tensor")),  # LoRA B [r, out]: its output side split like the weight's
    (r"^token_rows$", (None, "fsdp")),  # [K, D] trained embedding rows (kwjax.token_rows): D as the embedding's
    (r".*", ()),  # norms: replicated
]


class MeshError(ValueError):
    """A mesh shape that does not fit the devices, or a batch that does not split over it."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    explicit = devices is not None
    devices = list(devices if explicit else jax.devices())
    n = len(devices)
    if min(fsdp, tensor) < 1 or data == 0 or data < -1:
        raise MeshError(f"mesh sizes must be positive (data may be -1): data={data} fsdp={fsdp} tensor={tensor}")
    if data == -1:
        if n % (fsdp * tensor):
            raise MeshError(f"{n} devices do not divide into fsdp={fsdp} × tensor={tensor}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise MeshError(f"mesh data={data} × fsdp={fsdp} × tensor={tensor} = {data * fsdp * tensor} "
                        f"but there are {n} devices")
    return Mesh(_arrange(devices, (data, fsdp, tensor), explicit), AXES)


def _arrange(devices: list, shape: tuple[int, int, int], explicit: bool) -> np.ndarray:
    """Devices laid out as the mesh: on a TPU slice by its physical topology (so the fsdp and tensor
    axes, the most communication-heavy, run over neighbouring chips), otherwise in the given order."""
    if not explicit and devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError) as e:  # a shape the topology cannot host
            logging.getLogger(__name__).warning("mesh %s: no topology-aware layout (%s); devices in id order",
                                                shape, e)
    return np.asarray(devices).reshape(shape)


def param_path(keys) -> str:
    """A tree path as the rules match it: keys joined by "/", e.g. `layer_0/attn/q`."""
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, spec in RULES:
        if re.search(pattern, path):
            dims = []
            for size, axis in zip(shape, spec + (None,) * (len(shape) - len(spec))):
                dims.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
            return P(*dims)
    return P()


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a params pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, x: NamedSharding(mesh, param_spec(param_path(keys), x.shape, mesh)), params)


def sharding_for_path(mesh: Mesh, shapes):
    """`load(shardings=...)` callback: the sharding of one parameter path, placed as it is read."""
    flat = {param_path(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes)}
    return lambda path: NamedSharding(mesh, param_spec("/".join(path), flat["/".join(path)], mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
