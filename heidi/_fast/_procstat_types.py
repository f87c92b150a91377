"""The snapshot `Sampler.sample()` returns, shared by `_procstat_py` and `_procstat_c`.

Defined once so that both twins return the very same type.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ("Snapshot",)


class Snapshot(NamedTuple):
    """System counters at one instant: cumulative CPU jiffies (busy, total) and memory in kB."""

    cpu_busy: int
    cpu_total: int
    mem_total_kb: int
    mem_available_kb: int
