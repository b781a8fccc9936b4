"""GGUF files (llama.cpp): dequantized with the `gguf` package, one tensor at a time.

llama.cpp's converter stores every Gemma norm weight as `1 + w` (its RMSNorm multiplies by the stored
weight directly); kwjax's RMSNorm multiplies by `1 + w`, so 1 is subtracted on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kwjax.config import ConfigError, ModelConfig
from kwjax.weights import layout
from kwjax.gguf_file import GGUFFile, GGUFFormatError
from kwjax.weights.tree import WeightsError, rows_to_device, set_path, to_device


def open_file(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise WeightsError(str(e)) from None


def read(path: str | Path, dtype, shardings: Callable[[tuple[str, ...]], Any] | None = None
         ) -> tuple[ModelConfig, dict]:
    path = Path(path)
    file = open_file(path)
    tensors = file.tensors
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path}: no 'token_embd.weight' tensor; not a Gemma 3 GGUF")
    vocab = int(tensors["token_embd.weight"].shape[0])
    try:
        config = ModelConfig.from_gguf_fields(file.fields, vocab, source=str(path))
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    table = layout.entries(config)
    expected = {layout.gguf_name(e.hf_name) for e in table}
    unexpected = sorted(set(tensors) - expected - {"output.weight", "rope_freqs.weight"})
    if unexpected:
        raise WeightsError(f"{path}: tensors not in a Gemma 3 model of {config.num_layers} layers: "
                           f"{', '.join(unexpected[:5])}")
    params: dict = {}
    for entry in table:
        name = layout.gguf_name(entry.hf_name)
        if name not in tensors:
            raise WeightsError(f"{path}: tensor {name!r} is missing")
        shape = tensors[name].shape
        if shape != entry.hf_shape:
            raise WeightsError(f"{path}: tensor {name!r} has shape {shape}, expected {entry.hf_shape} "
                               "from the file's own metadata")
        sharding = shardings(entry.path) if shardings else None
        if entry.path == ("embedding",):
            value = rows_to_device(shape, dtype, lambda rows, n=name: file.dequantize_rows(n, rows), sharding)
        else:
            array = file.dequantize_rows(name)
            if entry.is_norm:
                array = array - 1.0
            value = to_device(entry.to_kwjax(array), dtype, sharding)
        set_path(params, entry.path, value)
    return config, params
