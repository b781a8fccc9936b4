"""Training checkpoints with Orbax's CheckpointManager: periodic, final, the last K kept.

A checkpoint holds the train state (params, optimizer state, step) and a JSON record of where the
run stands (epoch, position in the data order, seed, method). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest restorable one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def as_path(directory: str | Path):
    """A local path (made absolute) or, for a URL such as gs://bucket/run, an `etils.epath.Path` that
    Orbax writes through (gs:// needs `gcsfs`, see docs/TPU.md)."""
    if "://" in str(directory):
        from etils import epath

        return epath.Path(str(directory))
    return Path(directory).expanduser().absolute()


class Checkpointer:
    """Multi-process: every process creates one and calls `save`/`restore` together; Orbax writes each
    process's shards and process 0 the metadata, so the directory must be one that all processes see."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = as_path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The JSON record of a checkpoint alone: checked before the state is restored into a tree."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        self.manager.close()
