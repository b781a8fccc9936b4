"""Placing converted tensors into the params tree, one tensor at a time."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_CHUNK_BYTES = 64 * 2**20


class WeightsError(ValueError):
    """A checkpoint is missing, truncated, of another architecture, or disagrees with its config."""


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def to_device(array: np.ndarray, dtype, sharding=None) -> jax.Array:
    """Casts on the host and hands the buffer to JAX; the host copy is freed when the caller drops it."""
    host = np.asarray(array).astype(dtype, copy=False)
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


def rows_to_device(shape: tuple[int, ...], dtype, get_rows: Callable[[slice], np.ndarray],
                   sharding=None) -> jax.Array:
    """Builds a large tensor (the embedding) on device from row blocks converted on the host.

    Converting or dequantizing it whole would hold float32 temporaries several times its final
    size; here the host only ever holds one block, and the device buffer is updated in place.
    """
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    if shape[0] <= step:
        return to_device(get_rows(slice(0, shape[0])), dtype, sharding)
    buffer = jnp.zeros(shape, dtype, device=sharding)
    for start in range(0, shape[0], step):
        block = np.asarray(get_rows(slice(start, min(start + step, shape[0])))).astype(dtype, copy=False)
        buffer = _write_rows(buffer, block, start)
    return buffer


class Stored(NamedTuple):
    """One tensor as a checkpoint file holds it (torch's layout)."""

    shape: tuple[int, ...]
    rows: Callable[..., np.ndarray]  # rows(slice) -> those rows as numpy; rows() -> all of it
    where: Any  # the file, for errors


def fill_params(table, lookup: Callable[[Any], tuple[str, Stored | None]], dtype,
                shardings: Callable[[tuple[str, ...]], Any] | None, *, source, shape_error: str) -> dict:
    """The params tree from a checkpoint, one `layout.Entry` at a time, each placed on device before the
    next is read. Only `lookup(entry)` (its name in the file, and the tensor or None when absent) is
    format-specific; `source` names the checkpoint in "missing" errors, and `shape_error` words the
    mismatch ({name}, {shape}, {expected}) since each format knows differently where the shape came from."""
    params: dict = {}
    for entry in table:
        name, stored = lookup(entry)
        if stored is None:
            raise WeightsError(f"{source}: tensor {name!r} is missing")
        if stored.shape != entry.hf_shape:
            raise WeightsError(f"{stored.where}: " + shape_error.format(name=name, shape=stored.shape,
                                                                         expected=entry.hf_shape))
        sharding = shardings(entry.path) if shardings else None
        if entry.path == ("embedding",):
            value = rows_to_device(stored.shape, dtype, stored.rows, sharding)
        else:
            value = to_device(entry.to_kwjax(stored.rows()), dtype, sharding)
        set_path(params, entry.path, value)
    return params
