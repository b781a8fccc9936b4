"""kwjax's own model directories: config.json + tokenizer files + an Orbax checkpoint of the params.

The config is written in Hugging Face form so one parser serves both; `kwjax.json` marks the
directory as kwjax's so `load` can tell it from a Hugging Face export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax

from kwjax.models.gemma3.config import ModelConfig
from kwjax.models.gemma3.model import param_shapes
from kwjax.weights.tree import WeightsError

MARKER = "kwjax.json"
FORMAT = "kwjax-model"


def is_native(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def _this_process_only() -> dict:
    """Orbax options that make a save or restore this process's own business (no barrier with the other
    processes of a multi-process run): model directories are written by process 0 alone, and read by
    each process from its own disk."""
    if jax.process_count() == 1:
        return {}
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})}


def write(directory: str | Path, config: ModelConfig, params: dict) -> None:
    """Writes the directory from this process alone; `params` must be whole here (host arrays or arrays
    on this process's devices; gather sharded ones with `kwjax.distributed.to_host` first)."""
    import orbax.checkpoint as ocp

    spread = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(params)
              if isinstance(x, jax.Array) and not x.is_fully_addressable]
    if spread:
        raise WeightsError(f"{directory}: parameters {spread[:3]} are spread over several processes; gather "
                           "them first (kwjax.distributed.to_host), then write from one process")
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    checkpointer = ocp.StandardCheckpointer(**_this_process_only())
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    # The marker goes last: a directory without it was never completely written.
    (directory / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1}))


def read(directory: str | Path, dtype, shardings: Callable[[tuple[str, ...]], Any] | None = None
         ) -> tuple[ModelConfig, dict]:
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{directory / MARKER}: unreadable kwjax marker ({e})") from None
    if marker.get("format") != FORMAT:
        raise WeightsError(f"{directory / MARKER}: format is {marker.get('format')!r}, expected {FORMAT!r}")
    config = ModelConfig.from_json_file(directory / "config.json")
    if not (directory / "params").is_dir():
        raise WeightsError(f"{directory}: no 'params' checkpoint folder")

    def target(path, leaf):
        keys = tuple(k.key for k in path)
        sharding = shardings(keys) if shardings else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(target, param_shapes(config, dtype))
    _check_shapes(directory / "params", abstract)
    try:
        # shardings spanning processes need every process in the restore; a local device only this one
        spans = shardings is not None and not all(x.sharding.is_fully_addressable for x in jax.tree.leaves(abstract))
        params = ocp.StandardCheckpointer(**({} if spans else _this_process_only())).restore(
            directory / "params", abstract)
    except Exception as e:  # Orbax raises many types; the message is what the user needs
        raise WeightsError(f"{directory / 'params'}: cannot restore parameters for the model in "
                           f"config.json ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    return config, params


def _check_shapes(params_dir: Path, abstract: dict) -> None:
    """Compares stored shapes with the config's before restoring, for an error that names the tensor."""
    import orbax.checkpoint as ocp

    try:
        stored = ocp.StandardCheckpointer(**_this_process_only()).metadata(params_dir).item_metadata
    except Exception as e:
        raise WeightsError(f"{params_dir}: unreadable Orbax checkpoint ({type(e).__name__}: {e})") from None
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise WeightsError(f"{params_dir}: parameters do not match config.json (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
    for key, shape in want.items():
        if have[key] != shape:
            raise WeightsError(f"{params_dir}: cannot restore parameters: {key} is stored with shape "
                               f"{have[key]} but config.json implies {shape}")
