"""/proc metrics for the governor and usage_delta, pure-Python twin of `_procstat_c`.

Parsers take bytes (so tests feed fixtures); read_* and Sampler read /proc with one read() each.
"""
from __future__ import annotations

import os

from ._procstat_types import Snapshot

__all__ = ("COMPILED", "Snapshot", "Sampler", "parse_stat", "parse_meminfo", "parse_statm",
           "read_cpu_times", "read_meminfo")

COMPILED = False
# /proc/stat's first line is the one we need; the rest (per-cpu lines, a long "intr" line) can be
# tens of kB on a big box and is not read.
_STAT_READ = 16 * 1024
_MEMINFO_READ = 64 * 1024
_MAX_DIGITS = 19  # fits in 64 bits: what the compiled twin accepts too
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def parse_stat(data: bytes) -> tuple[int, int]:
    """(busy_jiffies, total_jiffies) from the aggregate "cpu " line of /proc/stat.

    total = user+nice+system+idle+iowait+irq+softirq+steal (guest time is already counted in
    user/nice); busy = total - idle - iowait."""
    if data.startswith(b"cpu "):
        start = 0
    else:
        start = data.find(b"\ncpu ") + 1
        if start == 0:
            raise ValueError("/proc/stat: no 'cpu ' line")
    end = data.find(b"\n", start)
    fields = data[start:end if end >= 0 else len(data)].split()[1:9]
    if len(fields) < 4:
        raise ValueError(f"/proc/stat: the cpu line has {len(fields)} fields, "
                         "expected at least 4 (user nice system idle)")
    values = []
    for field in fields:
        if not field.isdigit() or len(field) > _MAX_DIGITS:
            raise ValueError(f"/proc/stat: bad number {field[:24]!r} in the cpu line")
        values.append(int(field))
    total = sum(values)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def parse_meminfo(data: bytes) -> dict[str, int]:
    """{"MemTotal": kB, "MemAvailable": kB, ...} from /proc/meminfo (counts such as
    HugePages_Total are kept as they are). MemTotal and MemAvailable must be present."""
    info = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        key, sep, rest = line.partition(b":")
        if not sep:
            raise ValueError(f"/proc/meminfo: no ':' in line {line[:40]!r}")
        parts = rest.split(None, 1)
        if not parts or not parts[0].isdigit() or len(parts[0]) > _MAX_DIGITS:
            raise ValueError(f"/proc/meminfo: bad value for {key.decode('latin-1')}")
        info[key.decode("latin-1")] = int(parts[0])
    for name in ("MemTotal", "MemAvailable"):
        if name not in info:
            raise ValueError(f"/proc/meminfo: {name} missing")
    return info


def parse_statm(data: bytes) -> int:
    """Resident pages (the second field) from /proc/<pid>/statm."""
    fields = data.split(None, 2)
    if len(fields) < 2 or not fields[1].isdigit() or len(fields[1]) > _MAX_DIGITS:
        raise ValueError("statm: no resident page count")
    return int(fields[1])


def _read(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def read_cpu_times() -> tuple[int, int]:
    """(busy_jiffies, total_jiffies) now; see parse_stat."""
    return parse_stat(_read("/proc/stat", _STAT_READ))


def read_meminfo() -> dict[str, int]:
    """/proc/meminfo as a dict of kB values; see parse_meminfo."""
    return parse_meminfo(_read("/proc/meminfo", _MEMINFO_READ))


class Sampler:
    """Keeps /proc/stat and /proc/meminfo open and re-reads them from offset 0 (pread), so a
    sample costs two syscalls; safe to share between threads."""

    def __init__(self) -> None:
        self._stat_fd = os.open("/proc/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._mem_fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self._stat_fd)
            raise

    def sample(self) -> Snapshot:
        busy, total = parse_stat(os.pread(self._stat_fd, _STAT_READ, 0))
        info = parse_meminfo(os.pread(self._mem_fd, _MEMINFO_READ, 0))
        return Snapshot(busy, total, info["MemTotal"], info["MemAvailable"])

    def system_cpu_pct(self, before: Snapshot, after: Snapshot) -> float:
        """Busy share of all CPUs between two samples, 0..100 (0 if no time passed)."""
        total = after.cpu_total - before.cpu_total
        if total <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * (after.cpu_busy - before.cpu_busy) / total))

    def mem_used_pct(self, snapshot: Snapshot) -> float:
        if snapshot.mem_total_kb <= 0:
            return 0.0
        used = snapshot.mem_total_kb - snapshot.mem_available_kb
        return min(100.0, max(0.0, 100.0 * used / snapshot.mem_total_kb))

    def mem_available_kb(self, snapshot: Snapshot) -> int:
        return snapshot.mem_available_kb

    def process_rss_kb(self, pid: int | None = None) -> int:
        """Resident set size of pid (default: this process) in kB, from /proc/<pid>/statm."""
        path = "/proc/self/statm" if pid is None else f"/proc/{int(pid)}/statm"
        return parse_statm(_read(path, 256)) * _PAGE_KB

    def close(self) -> None:
        for name in ("_stat_fd", "_mem_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
