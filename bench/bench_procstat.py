"""/proc parsing speed: compiled _procstat_c vs pure _procstat_py on this machine's /proc/stat and
/proc/meminfo (captured once), plus a whole Sampler.sample() (two preads and both parses).

Run: python -m pytest bench/bench_procstat.py --benchmark-only
"""
from __future__ import annotations

import importlib

import pytest

from heidi._fast import _procstat_py

try:
    _procstat_c = importlib.import_module("heidi._fast._procstat_c")
except ImportError:  # reported as "n/a" in the ratio table; the other rows still run
    _procstat_c = None

with open("/proc/stat", "rb") as _f:
    STAT = _f.read()
with open("/proc/meminfo", "rb") as _f:
    MEMINFO = _f.read()

IMPLS = {"compiled": _procstat_c, "pure": _procstat_py}
CASES = ("parse_stat", "parse_meminfo", "Sampler.sample")
_MEDIANS: dict[tuple[str, str], float] = {}


def _module(impl: str):
    module = IMPLS[impl]
    if module is None:
        pytest.skip("heidi._fast._procstat_c is not built")
    return module


@pytest.fixture(scope="module", autouse=True)
def ratio_report(request):
    """After the module, print each case's medians and the compiled speed-up."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _MEDIANS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("procstat medians and compiled speed-up over pure:")
        for case in CASES:
            pure, compiled = _MEDIANS.get((case, "pure")), _MEDIANS.get((case, "compiled"))
            cells = [f"{impl} {m * 1e6:.2f} us" if m else f"{impl} n/a"
                     for impl, m in (("compiled", compiled), ("pure", pure))]
            speedup = f" -> {pure / compiled:.1f}x" if pure and compiled else ""
            reporter.write_line(f"  {case:15s} " + " | ".join(cells) + speedup)


def test_twins_agree_on_this_machine():
    """Not timed: a speed-up only counts if both parse the same."""
    if _procstat_c is None:
        pytest.skip("heidi._fast._procstat_c is not built")
    assert _procstat_c.parse_stat(STAT) == _procstat_py.parse_stat(STAT)
    assert _procstat_c.parse_meminfo(MEMINFO) == _procstat_py.parse_meminfo(MEMINFO)


def _run(benchmark, case: str, impl: str, fn, *args) -> None:
    benchmark(fn, *args)
    if benchmark.stats is not None:
        _MEDIANS[(case, impl)] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="procstat parse_stat")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_parse_stat(benchmark, impl):
    _run(benchmark, "parse_stat", impl, _module(impl).parse_stat, STAT)


@pytest.mark.benchmark(group="procstat parse_meminfo")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_parse_meminfo(benchmark, impl):
    _run(benchmark, "parse_meminfo", impl, _module(impl).parse_meminfo, MEMINFO)


@pytest.mark.benchmark(group="procstat Sampler.sample")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_sampler_sample(benchmark, impl):
    sampler = _module(impl).Sampler()
    try:
        _run(benchmark, "Sampler.sample", impl, sampler.sample)
    finally:
        sampler.close()
