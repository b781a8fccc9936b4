"""XLA compilations in this process, counted with their seconds: a task's record can then say how many
shapes it compiled and what they cost (bucketing mistakes show up as counts, not as slow runs)."""

from __future__ import annotations

import dataclasses
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_totals = [0, 0.0]  # compilations, seconds
_registered = False


def _listener(event: str, duration: float, **_) -> None:
    if event == _EVENT:
        with _lock:
            _totals[0] += 1
            _totals[1] += duration


@dataclasses.dataclass
class Counter:
    """Compilations since `start()`: `count` and `seconds` read the difference at any time."""

    _count0: int = 0
    _seconds0: float = 0.0

    @classmethod
    def start(cls) -> "Counter":
        global _registered
        with _lock:
            if not _registered:
                jax.monitoring.register_event_duration_secs_listener(_listener)
                _registered = True
            return cls(_totals[0], _totals[1])

    @property
    def count(self) -> int:
        return _totals[0] - self._count0

    @property
    def seconds(self) -> float:
        return _totals[1] - self._seconds0

    def as_timings(self) -> dict:
        return {"xla_compiles": self.count, "xla_compile_s": round(self.seconds, 2)}
