"""The per-task peak memory: /proc's high-water mark, reset between tasks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kwjax import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def test_peak_sees_a_freed_allocation_and_reset_forgets_it():
    assert memory.reset_peak()
    before = memory.status_kib("VmRSS") / 1024
    block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched so it is resident
    del block
    peak = memory.peak_mib()
    assert peak >= before + 290, (before, peak)
    assert memory.status_kib("VmRSS") / 1024 < peak - 250  # freed: the peak remembers, the RSS does not
    assert memory.reset_peak()
    assert memory.peak_mib() < peak - 250
