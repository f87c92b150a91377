"""/proc parsers and Sampler (both twins): identical results on real captures and odd inputs,
clear ValueErrors on malformed ones, and sane live readings."""
from __future__ import annotations

import os
import time

import pytest

from heidi._fast._procstat_types import Snapshot

# Captured from the development VM (2 CPUs, Linux 6.18) with `cat /proc/stat /proc/meminfo`.
REAL_STAT = (
    b'cpu  41323 0 8575 500050 466 0 178 70 0 0\n'
    b'cpu0 18207 0 3485 253505 80 0 5 30 0 0\n'
    b'cpu1 23115 0 5089 246544 386 0 173 40 0 0\n'
    b'intr 485884 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 14 0 0 0 0 551 8'
    b'9 0 57 1 122643 0 774 661 0 2563 6374 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 '
    b'0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n'
    b'ctxt 845498\n'
    b'btime 1795906597\n'
    b'processes 20312\n'
    b'procs_running 4\n'
    b'procs_blocked 0\n'
    b'softirq 392792 0 62735 3 1467 122634 0 2 77625 0 128326\n'
)
REAL_MEMINFO = (
    b'MemTotal:       24684092 kB\n'
    b'MemFree:        24090584 kB\n'
    b'MemAvailable:   24253756 kB\n'
    b'Buffers:            5732 kB\n'
    b'Cached:           349472 kB\n'
    b'SwapCached:            0 kB\n'
    b'Active:           175232 kB\n'
    b'Inactive:         274500 kB\n'
    b'Active(anon):       1580 kB\n'
    b'Inactive(anon):   101804 kB\n'
    b'Active(file):     173652 kB\n'
    b'Inactive(file):   172696 kB\n'
    b'Unevictable:       17540 kB\n'
    b'Mlocked:           16536 kB\n'
    b'SwapTotal:             0 kB\n'
    b'SwapFree:              0 kB\n'
    b'Zswap:                 0 kB\n'
    b'Zswapped:              0 kB\n'
    b'Dirty:            124472 kB\n'
    b'Writeback:            28 kB\n'
    b'AnonPages:        112212 kB\n'
    b'Mapped:            22128 kB\n'
    b'Shmem:              8856 kB\n'
    b'KReclaimable:      42656 kB\n'
    b'Slab:              65268 kB\n'
    b'SReclaimable:      42656 kB\n'
    b'SUnreclaim:        22612 kB\n'
    b'KernelStack:        1748 kB\n'
    b'PageTables:         2560 kB\n'
    b'SecPageTables:         0 kB\n'
    b'NFS_Unstable:          0 kB\n'
    b'Bounce:                0 kB\n'
    b'WritebackTmp:          0 kB\n'
    b'CommitLimit:    12342044 kB\n'
    b'Committed_AS:     196996 kB\n'
    b'VmallocTotal:   34359738367 kB\n'
    b'VmallocUsed:       14540 kB\n'
    b'VmallocChunk:          0 kB\n'
    b'Percpu:              688 kB\n'
    b'AnonHugePages:         0 kB\n'
    b'ShmemHugePages:        0 kB\n'
    b'ShmemPmdMapped:        0 kB\n'
    b'FileHugePages:     12288 kB\n'
    b'FilePmdMapped:         0 kB\n'
    b'Balloon:               0 kB\n'
    b'HugePages_Total:       0\n'
    b'HugePages_Free:        0\n'
    b'HugePages_Rsvd:        0\n'
    b'HugePages_Surp:        0\n'
    b'Hugepagesize:       2048 kB\n'
    b'Hugetlb:               0 kB\n'
    b'DirectMap4k:       26624 kB\n'
    b'DirectMap2M:     2070528 kB\n'
    b'DirectMap1G:    25165824 kB\n'
)

# An older kernel's /proc/stat (2.6.24-era: no steal/guest columns) and a big box's first line.
OLD_STAT = b"cpu  2255 34 2290 22625563 6290 127 456\ncpu0 1132 34 1441 11311718 3675 127 438\n"
WIDE_STAT = (b"cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0\n"
             b"cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\nintr 1 2 3\n")


def test_compiled_twin_really_loaded(fast_impl, impl_kind):
    mod = fast_impl("procstat")
    assert mod.COMPILED is (impl_kind == "c")
    assert mod.Snapshot is Snapshot


def test_parse_stat_real_capture(fast_impl):
    # cpu  41323 0 8575 500050 466 0 178 70 0 0: total 550662, idle+iowait 500516
    assert fast_impl("procstat").parse_stat(REAL_STAT) == (50146, 550662)


def test_parse_stat_known_values(fast_impl):
    mod = fast_impl("procstat")
    # total excludes guest/guest_nice (already inside user/nice); idle includes iowait.
    total = 10132153 + 290696 + 3084719 + 46828483 + 16683 + 0 + 25195 + 0
    assert mod.parse_stat(WIDE_STAT) == (total - 46828483 - 16683, total)
    total = 2255 + 34 + 2290 + 22625563 + 6290 + 127 + 456
    assert mod.parse_stat(OLD_STAT) == (total - 22625563 - 6290, total)
    assert mod.parse_stat(b"cpu 1 2 3 4") == (6, 10)  # no iowait column, no final newline
    assert mod.parse_stat(b"intr 5\ncpu  1 2\t3 4 5\r\n") == (6, 15)  # not first; odd blanks


@pytest.mark.parametrize("data, message", [
    (b"", "no 'cpu ' line"),
    (b"cpu0 1 2 3 4\nintr 1\n", "no 'cpu ' line"),
    (b"cpu 1 2 3\ncpu0 1 2 3 4 5\n", "the cpu line has 3 fields, expected at least 4"),
    (b"cpu \n", "the cpu line has 0 fields"),
    (b"cpu 1 2 x 4\n", "bad number b'x'"),
    (b"cpu 1 2 -3 4\n", "bad number b'-3'"),
    (b"cpu 1 2 3 4.5\n", "bad number b'4.5'"),
    (b"cpu 1 2 3 99999999999999999999\n", "bad number b'99999999999999999999'"),
])
def test_parse_stat_rejects_odd_input(fast_impl, data, message):
    with pytest.raises(ValueError, match="^/proc/stat: " + message.replace("(", r"\(")):
        fast_impl("procstat").parse_stat(data)


def test_parse_meminfo_real_capture(fast_impl):
    info = fast_impl("procstat").parse_meminfo(REAL_MEMINFO)
    expected = {}
    for line in REAL_MEMINFO.decode().splitlines():
        key, value = line.split(":")
        expected[key] = int(value.split()[0])
    assert info == expected and len(info) == 54
    assert (info["MemTotal"], info["MemAvailable"]) == (24684092, 24253756)
    assert info["HugePages_Total"] == 0  # a count, no unit


def test_parsers_agree_between_twins():
    from heidi._fast import _procstat_py
    try:
        from heidi._fast import _procstat_c
    except ImportError:
        pytest.skip("compiled twin not built")
    for data in (REAL_STAT, OLD_STAT, WIDE_STAT):
        assert _procstat_c.parse_stat(data) == _procstat_py.parse_stat(data)
    assert _procstat_c.parse_meminfo(REAL_MEMINFO) == _procstat_py.parse_meminfo(REAL_MEMINFO)
    live = open("/proc/meminfo", "rb").read()
    assert set(_procstat_c.parse_meminfo(live)) == set(_procstat_py.parse_meminfo(live))


@pytest.mark.parametrize("data, message", [
    (b"MemTotal: 100 kB\n", "MemAvailable missing"),
    (b"MemAvailable: 100 kB\n", "MemTotal missing"),
    (b"MemTotal: 100 kB\nMemAvailable 5 kB\n", "no ':' in line b'MemAvailable 5 kB'"),
    (b"MemTotal: 100 kB\nMemAvailable:\n", "bad value for MemAvailable"),
    (b"MemTotal: 100kB\nMemAvailable: 1 kB\n", "bad value for MemTotal"),
    (b"MemTotal: -1 kB\nMemAvailable: 1 kB\n", "bad value for MemTotal"),
    (b"", "MemTotal missing"),
])
def test_parse_meminfo_rejects_odd_input(fast_impl, data, message):
    with pytest.raises(ValueError, match="^/proc/meminfo: " + message.replace("(", r"\(")):
        fast_impl("procstat").parse_meminfo(data)


def test_parse_meminfo_tolerates_blank_lines_and_tabs(fast_impl):
    info = fast_impl("procstat").parse_meminfo(b"\nMemTotal:\t1000 kB\n\nMemAvailable: 250\n")
    assert info == {"MemTotal": 1000, "MemAvailable": 250}


def test_parse_statm(fast_impl):
    mod = fast_impl("procstat")
    assert mod.parse_statm(b"765 410 382 5 0 123 0\n") == 410
    for bad in (b"", b"765", b"765 x 1"):
        with pytest.raises(ValueError):
            mod.parse_statm(bad)


def test_read_functions_read_this_machine(fast_impl):
    mod = fast_impl("procstat")
    busy, total = mod.read_cpu_times()
    assert 0 <= busy <= total
    info = mod.read_meminfo()
    assert 0 < info["MemAvailable"] <= info["MemTotal"]


def test_sampler(fast_impl):
    mod = fast_impl("procstat")
    with mod.Sampler() as sampler:
        before = sampler.sample()
        t = time.process_time()
        while time.process_time() - t < 0.05:  # some busy time, so the delta is not empty
            pass
        after = sampler.sample()
        assert isinstance(after, Snapshot)
        assert after.cpu_total >= before.cpu_total and after.cpu_busy >= before.cpu_busy
        assert 0.0 <= sampler.system_cpu_pct(before, after) <= 100.0
        assert sampler.system_cpu_pct(after, after) == 0.0
        assert 0.0 < sampler.mem_used_pct(after) < 100.0
        assert sampler.mem_available_kb(after) == after.mem_available_kb
        own = sampler.process_rss_kb()
        assert 1000 < own < 10_000_000
        assert abs(sampler.process_rss_kb(os.getpid()) - own) < 10_000
        with pytest.raises(OSError):
            sampler.process_rss_kb(2 ** 22 + 12345)  # above pid_max: never a process


def test_sampler_computations_on_fixed_snapshots(fast_impl):
    sampler = fast_impl("procstat").Sampler()
    a, b = Snapshot(100, 1000, 8000, 2000), Snapshot(175, 1100, 8000, 6000)
    assert sampler.system_cpu_pct(a, b) == 75.0
    assert sampler.mem_used_pct(a) == 75.0 and sampler.mem_used_pct(b) == 25.0
    assert sampler.mem_available_kb(b) == 6000
    sampler.close()
    sampler.close()  # idempotent
