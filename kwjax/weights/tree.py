"""Placing converted tensors into the params tree, one tensor at a time."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


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
