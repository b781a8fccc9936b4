"""A small safetensors reader and writer on numpy memory maps.

Our own, rather than the `safetensors` package's numpy API, for two reasons: bfloat16 tensors come
back as `ml_dtypes.bfloat16` views without a float32 detour, and a truncated or corrupt file is
reported with the file and tensor name before any weight is touched.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from kwjax.files import atomic_path

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


class SafetensorsFile:
    """Lazy access to the tensors of one file; nothing is read until a tensor is asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, 100 * 2**20):
                raise SafetensorsError(f"{self.path}: header length {header_len} is invalid for a "
                                       f"{size}-byte file (not safetensors, or truncated)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                       f"{info!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} byte range does not match its "
                                       f"shape {shape} and dtype {info['dtype']}")
            if self._data_start + end > size:
                raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                       f"{self._data_start + end} but the file has {size} bytes")
            self._entries[name] = (dtype, shape, begin, end)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """A read-only view into the memory-mapped file (no copy)."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype, shape, begin, end = self._entries[name]
        start = self._data_start + begin
        return self._mmap[start:self._data_start + end].view(dtype).reshape(shape)


def save(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
         fetch: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors one at a time: `fetch(name)` is called as each is written, so the caller never
    needs every converted tensor in memory at once. Written to a temporary name, then renamed
    (a failed fetch leaves no half file)."""
    specs = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in specs]
    header: dict = {"__metadata__": dict(metadata or {"format": "np"})}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _NAMES:
            raise SafetensorsError(f"{path}: cannot store tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != shape:
                raise SafetensorsError(f"{path}: tensor {name!r} has shape {array.shape}, header says {shape}")
            f.write(array.tobytes())

