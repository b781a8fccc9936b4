"""GGUF files (llama.cpp): dequantized with the `gguf` package, one tensor at a time.

llama.cpp's converter stores every Gemma norm weight as `1 + w` (its RMSNorm multiplies by the stored
weight directly); kwjax's RMSNorm multiplies by `1 + w`, so 1 is subtracted on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kwjax.models.gemma3.config import ConfigError, ModelConfig
from kwjax.models.gemma3 import layout
from kwjax.gguf_file import GGUFFile, GGUFFormatError
from kwjax.weights.tree import Stored, WeightsError, fill_params


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

    def lookup(entry):
        name = layout.gguf_name(entry.hf_name)
        if name not in tensors:
            return name, None

        def rows(r: slice = slice(None)):
            array = file.dequantize_rows(name, r)
            return array - 1.0 if entry.is_norm else array

        return name, Stored(tensors[name].shape, rows, path)

    return config, fill_params(table, lookup, dtype, shardings, source=path, shape_error=(
        "tensor {name!r} has shape {shape}, expected {expected} from the file's own metadata"))
