"""What a finished piece of an experiment workdir records about itself.

Every task directory (one training run, one evaluation) holds a small JSON marker: the fingerprint of
the settings that made it, whether it finished, and what it cost (seconds, peak memory, final step).
The experiment writes it and trusts it on a rerun; the report reads it back. Both import it from here,
so neither needs the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from kwjax.files import atomic_write_text

DONE = "kwjax-experiment.json"  # the marker's file name in a task directory


def read_marker(directory: str | Path) -> dict | None:
    """The directory's marker, or None when it has none (never started, or not by an experiment)."""
    path = Path(directory) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def write_marker(directory: str | Path, fingerprint: str, finished: bool, **extra) -> None:
    atomic_write_text(Path(directory) / DONE, json.dumps({"fingerprint": fingerprint, "finished": finished,
                                                          **extra}, indent=2))
