"""GGUF files (llama.cpp): dequantized with the `gguf` package, one tensor at a time.

llama.cpp's converter stores every Gemma norm weight as `1 + w` (its RMSNorm multiplies by the stored
weight directly); kwjax's RMSNorm multiplies by `1 + w`, so 1 is subtracted on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from kwjax.config import ConfigError, ModelConfig
from kwjax.weights import layout
from kwjax.weights.tree import WeightsError, set_path, to_device

_SKIP_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges")


def open_reader(path: str | Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on damaged headers
        raise WeightsError(f"{path}: cannot parse GGUF header ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise WeightsError(f"{path}: truncated: tensor {t.name!r} ends at byte "
                               f"{t.data_offset + t.n_bytes} but the file has {size} bytes")
    return reader


def metadata(reader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key in _SKIP_FIELDS:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # exotic field types are not needed for Gemma
            continue
    return out


def read(path: str | Path, dtype, shardings: Callable[[tuple[str, ...]], Any] | None = None
         ) -> tuple[ModelConfig, dict]:
    import gguf

    path = Path(path)
    reader = open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = metadata(reader)
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path}: no 'token_embd.weight' tensor; not a Gemma 3 GGUF")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF lists dimensions innermost first
    try:
        config = ModelConfig.from_gguf_fields(fields, vocab, source=str(path))
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
        t = tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))
        if shape != entry.hf_shape:
            raise WeightsError(f"{path}: tensor {name!r} has shape {shape}, expected {entry.hf_shape} "
                               "from the file's own metadata")
        array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if entry.is_norm:
            array = array.astype(np.float32) - 1.0
        set_path(params, entry.path, to_device(entry.to_kwjax(array), dtype,
                                               shardings(entry.path) if shardings else None))
    return config, params
