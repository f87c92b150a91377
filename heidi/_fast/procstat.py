"""/proc metrics: the compiled `_procstat_c` unless it is absent or HEIDI_NO_EXTENSIONS is set.

read_cpu_times() -> (busy, total) jiffies; read_meminfo() -> {name: kB}; parse_stat/parse_meminfo/
parse_statm on bytes; Sampler().sample() -> Snapshot, with system_cpu_pct(before, after),
mem_used_pct(s), mem_available_kb(s) and process_rss_kb(pid=None).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import no_extensions

__all__ = ("COMPILED", "Sampler", "Snapshot", "parse_meminfo", "parse_stat", "parse_statm",
           "read_cpu_times", "read_meminfo")

if TYPE_CHECKING:
    from ._procstat_py import (Sampler, Snapshot, parse_meminfo, parse_stat, parse_statm,
                               read_cpu_times, read_meminfo)
    COMPILED = False
else:
    try:
        if no_extensions():
            raise ImportError("HEIDI_NO_EXTENSIONS is set")
        from ._procstat_c import (Sampler, Snapshot, parse_meminfo, parse_stat, parse_statm,
                                  read_cpu_times, read_meminfo)
        COMPILED = True
    except ImportError:
        from ._procstat_py import (Sampler, Snapshot, parse_meminfo, parse_stat, parse_statm,
                                   read_cpu_times, read_meminfo)
        COMPILED = False
