"""A lean GGUF (v2/v3) parser: metadata as Python values, tensors as lazy memory-mapped views.

`gguf.GGUFReader` builds numpy objects for every element of every metadata array; for Gemma's
262k-token vocabulary that costs ~700 MB of host memory, as much as the model itself. This reader
keeps arrays as plain lists (strings) or single numpy arrays (numbers) and maps tensor data lazily.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), the reverse of GGUF's listing
    ggml_type: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            n_tensors, self.fields = _read_header(f, self.path)
            try:
                infos = []
                for _ in range(n_tensors):
                    name = _read_string(f)
                    (n_dims,) = struct.unpack("<I", f.read(4))
                    dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
                    ggml_type, offset = struct.unpack("<IQ", f.read(12))
                    infos.append((name, dims, ggml_type, offset))
            except (struct.error, UnicodeDecodeError, MemoryError, OverflowError, GGUFFormatError) as e:
                raise GGUFFormatError(f"{self.path}: damaged or truncated GGUF tensor table ({e})") from None
            align = int(self.fields.get("general.alignment", 32))
            data_start = -(-f.tell() // align) * align
        import gguf

        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{self.path}: tensor {name!r} has unknown type {ggml_type}") from None
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            info = TensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, data_start + offset, n_bytes)
            if info.offset + n_bytes > size:
                raise GGUFFormatError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                      f"{info.offset + n_bytes} but the file has {size} bytes")
            self.tensors[name] = info
        self._mmap = None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as rows ([rows, bytes per row]), a view into the mapped file."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.tensors[name]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return self._mmap[info.offset:info.offset + info.n_bytes].reshape(rows, -1)

    def dequantize_rows(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Float32 values of a row range (outermost axis), dequantizing only those rows."""
        import gguf

        info = self.tensors[name]
        out = gguf.quants.dequantize(self.raw(name)[rows], gguf.GGMLQuantizationType(info.ggml_type))
        return np.asarray(out, np.float32).reshape((-1,) + info.shape[1:]) if len(info.shape) > 1 \
            else np.asarray(out, np.float32).reshape(info.shape)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata key/values of a GGUF file, without reading the tensor table or data."""
    path = Path(path)
    with path.open("rb") as f:
        return _read_header(f, path)[1]


def _read_header(f: BinaryIO, path: Path) -> tuple[int, dict[str, Any]]:
    """(tensor count, metadata) from the start of the file; errors name the file."""
    if f.read(4) != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    try:
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            fields[key] = _read_value(f, vtype)
    except GGUFFormatError as e:
        raise GGUFFormatError(f"{path}: corrupt or truncated GGUF metadata ({e})") from None
    except (struct.error, UnicodeDecodeError, MemoryError, OverflowError, ValueError) as e:
        raise GGUFFormatError(f"{path}: corrupt or truncated GGUF metadata ({e})") from None
    return n_tensors, fields


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFFormatError(f"unexpected end of file ({len(data)} of {n} bytes)")
    return data


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 1 << 24:
        raise GGUFFormatError(f"string length {n} is implausible")
    return _read_exact(f, n).decode("utf-8")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        etype, n = struct.unpack("<IQ", f.read(12))
        if etype in _NUMPY:
            dtype = np.dtype(_NUMPY[etype])
            if n > 1 << 32:
                raise GGUFFormatError(f"array of {n} items is implausible")
            return np.frombuffer(_read_exact(f, n * dtype.itemsize), dtype=dtype).copy()
        if etype == _STRING:
            return [_read_string(f) for _ in range(n)]
        return [_read_value(f, etype) for _ in range(n)]
    raise GGUFFormatError(f"unknown metadata value type {vtype}")
