"""XLA compilations in this process, counted with their seconds: a task's record can then say how many
shapes it compiled and what they cost (bucketing mistakes show up as counts, not as slow runs)."""

from __future__ import annotations

import dataclasses
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"  # also fired, with the load's time, on a disk-cache hit
_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_totals = [0, 0.0, 0]  # backend compile events, their seconds, disk-cache hits among them
_registered = False


def _listener(event: str, duration: float, **_) -> None:
    if event == _EVENT:
        with _lock:
            _totals[0] += 1
            _totals[1] += duration


def _hit_listener(event: str, **_) -> None:
    if event == _HIT:
        with _lock:
            _totals[2] += 1


@dataclasses.dataclass
class Counter:
    """Compilations since `start()`: `count` and `seconds` read the difference at any time."""

    _count0: int = 0
    _seconds0: float = 0.0
    _hits0: int = 0

    @classmethod
    def start(cls) -> "Counter":
        global _registered
        with _lock:
            if not _registered:
                jax.monitoring.register_event_duration_secs_listener(_listener)
                jax.monitoring.register_event_listener(_hit_listener)
                _registered = True
            return cls(_totals[0], _totals[1], _totals[2])

    @property
    def count(self) -> int:
        """Programs compiled (a program loaded from the disk cache is a `hit`, not a compile)."""
        return _totals[0] - self._count0 - self.hits

    @property
    def hits(self) -> int:
        return _totals[2] - self._hits0

    @property
    def seconds(self) -> float:
        return _totals[1] - self._seconds0

    def as_timings(self) -> dict:
        return {"xla_compiles": self.count, "xla_cache_hits": self.hits, "xla_compile_s": round(self.seconds, 2)}


def use_disk_cache(directory=None, min_compile_seconds: float = 1.0) -> str | None:
    """Keeps compiled programs on disk (default: the user cache's `xla/`), so a task that compiles a
    program an earlier one did (SFT→DPO's DPO step, each evaluation's passes) or a rerun loads it
    instead of compiling; on 2 CPU cores a 270M train step takes 20-40 s to compile.
    KWJAX_XLA_CACHE=0 turns it off; a path there moves it. Returns the directory in use (None: off)."""
    import os

    setting = os.environ.get("KWJAX_XLA_CACHE", "")
    if setting == "0":
        return None
    if directory is None:
        from kwjax.paths import cache_dir

        directory = setting or cache_dir() / "xla"
    directory = str(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)  # small ones: no file
    return directory
