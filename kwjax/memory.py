"""Peak resident memory of a piece of work, from /proc (Linux); None where /proc is missing.

The kernel's high-water mark (VmHWM) covers the whole process; writing 5 to /proc/self/clear_refs
resets it to the current resident set, so the peak of one task (a training run, an evaluation) can
be read on its own, memory already resident (the weights) included.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def status_kib(key: str) -> int | None:
    """A /proc/self/status field in KiB: VmRSS (resident now), VmHWM (peak resident)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Restarts the peak from the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float | None:
    kib = status_kib("VmHWM")
    return None if kib is None else round(kib / 1024, 1)
