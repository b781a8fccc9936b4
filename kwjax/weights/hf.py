"""Hugging Face checkpoint directories: config.json plus single or sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kwjax.files import atomic_write_text
from kwjax.models.gemma3.config import ModelConfig
from kwjax.weights import safetensors
from kwjax.models.gemma3 import layout
from kwjax.weights.tree import Stored, WeightsError, fill_params, get_path

# Where the text decoder lives in the checkpoints transformers writes for Gemma 3:
# Gemma3ForCausalLM, Gemma3ForConditionalGeneration (4.x), and the same in 5.x.
_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
            "lm_head.", "language_model.lm_head.")


def _open_shards(directory: Path) -> dict[str, safetensors.SafetensorsFile]:
    """Maps every tensor name to the open file that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for shard in sorted(set(weight_map.values())):
            files[shard] = safetensors.SafetensorsFile(directory / shard)
        by_name = {}
        for name, shard in weight_map.items():
            if name not in files[shard]:
                raise WeightsError(f"{directory / shard}: index says it holds {name!r} but it does not")
            by_name[name] = files[shard]
        return by_name
    single = directory / "model.safetensors"
    if single.is_file():
        f = safetensors.SafetensorsFile(single)
        return {name: f for name in f.keys()}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
    hint = f" (found {', '.join(others)}: kwjax reads safetensors only)" if others else ""
    raise WeightsError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def read(directory: str | Path, dtype, shardings: Callable[[tuple[str, ...]], Any] | None = None
         ) -> tuple[ModelConfig, dict]:
    directory = Path(directory)
    config = ModelConfig.from_json_file(directory / "config.json")
    by_name = _open_shards(directory)
    prefix = next((p for p in _PREFIXES if p + "embed_tokens.weight" in by_name), None)
    if prefix is None:
        raise WeightsError(
            f"{directory}: no Gemma 3 embedding tensor (looked for "
            f"{', '.join(p + 'embed_tokens.weight' for p in _PREFIXES)}); not a Gemma 3 checkpoint")
    table = layout.entries(config)
    expected = {prefix + e.hf_name for e in table}
    unexpected = sorted(n for n in by_name if n not in expected and not n.startswith(_IGNORED)
                        and n.startswith(prefix))
    if unexpected:
        raise WeightsError(f"{directory}: tensors not in a Gemma 3 model with this config.json "
                           f"({config.num_layers} layers): {', '.join(unexpected[:5])}")

    def lookup(entry):
        name = prefix + entry.hf_name
        if name not in by_name:
            return name, None
        f = by_name[name]
        return name, Stored(f.shape(name), lambda r=slice(None): f.get(name)[r], f.path)

    return config, fill_params(table, lookup, dtype, shardings, source=directory,
                               shape_error="tensor {name!r} has shape {shape} but config.json implies {expected}")


def write(directory: str | Path, config: ModelConfig, params: dict, dtype=None) -> None:
    """Writes config.json and model.safetensors in transformers' layout, converting tensor by tensor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = {"model." + e.hf_name: e for e in layout.entries(config)}
    dtype = np.dtype(dtype or get_path(params, ("embedding",)).dtype)

    def fetch(name: str) -> np.ndarray:
        entry = table[name]
        return entry.to_hf(np.asarray(get_path(params, entry.path)).astype(dtype, copy=False))

    safetensors.save(directory / "model.safetensors",
                     [(name, e.hf_shape, dtype) for name, e in table.items()], fetch,
                     metadata={"format": "pt"})
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = str(dtype)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
