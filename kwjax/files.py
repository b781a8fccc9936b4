"""Writes that a reader never sees half done.

Every result kwjax leaves on disk (a finished task's marker, metrics.json, cached reference
log-probs, exported weights) is read back by a later run that trusts it. So each is written to a
temporary sibling and renamed over the target: the rename is atomic on one file system, and an
interrupted or failed write leaves the old file (or none), never a truncated one. The temporary
name is unique per writer, so two processes writing the same file do not write into each other's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; it replaces `path` when the block ends without
    an exception, and is removed when one is raised. For writers that stream (large weight files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def jsonl_objects(text: str, malformed: Callable[[int, json.JSONDecodeError], Exception]
                  ) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines text; a line that is not JSON
    raises `malformed(line number, error)`, so each reader names its file and says what to do in its own
    words. Blank lines (a trailing newline) are not rows."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise malformed(lineno, e) from None
        yield lineno, value


def atomic_save_npy(path: str | Path, array) -> None:
    # Through a file object: np.save given a name would append ".npy" to the temporary one.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))
