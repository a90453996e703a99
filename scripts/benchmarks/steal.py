"""Steal time: the CPU a virtual machine's hypervisor gives to other guests while this one wants it.

On a shared VM a few seconds of heavy steal stretch every latency measured in them (seen here: the p99 of
one app swinging from 3 ms to 45 ms between 4 s runs as steal went from 3% to 47%), and a comparison of
runs taken at different moments then measures the neighbours, not the software. A measurement taken
while the hypervisor stole more than a set share is repeated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_STAT = "/proc/stat"
_TICKS = os.sysconf("SC_CLK_TCK")


def steal_ticks() -> int | None:
    """Steal time of all CPUs so far, in clock ticks; None where the kernel does not say (not Linux)."""
    try:
        with open(_STAT, "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return int(fields[8]) if fields[:1] == [b"cpu"] and len(fields) > 8 else None


def quiet(measure: Callable[[], T], max_stolen: float, tries: int) -> tuple[T, float | None, int]:
    """`measure()` repeated, up to `tries` times, until the hypervisor stole at most `max_stolen` (a share of
    all CPUs' time) while it ran. Returns the last result, its stolen share (None if unknown) and the tries."""
    cpus = os.cpu_count() or 1
    for attempt in range(1, tries + 1):
        before, start = steal_ticks(), time.monotonic()
        result = measure()
        after, elapsed = steal_ticks(), time.monotonic() - start
        if before is None or after is None:
            return result, None, attempt
        stolen = (after - before) / _TICKS / (elapsed * cpus)
        if stolen <= max_stolen:
            break
    return result, stolen, attempt
