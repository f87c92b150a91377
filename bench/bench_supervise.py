"""Stage supervision cost: spawning and reaping /bin/true under run_supervised (compiled and pure)
against bare os.posix_spawn + os.waitpid in the same run; 1 GiB of output captured; and whether
another thread keeps running while the supervisor waits (the GIL released).

Run: python -m pytest bench/bench_supervise.py --benchmark-only   (design.md §10: overhead < 10%)
"""
from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import threading
import time

import pytest

from heidi._fast import _supervise_cgroup, _supervise_core, _supervise_py, _supervise_watchdog

try:
    _supervise_c = importlib.import_module("heidi._fast._supervise_c")
except ImportError:  # reported as "n/a" in the ratio table; the other rows still run
    _supervise_c = None

TARGET_OVERHEAD = 1.10
TRUE = "/bin/true"
CAPTURE_BYTES = 1 << 30
CAPTURE_ARGV = ["head", "-c", str(CAPTURE_BYTES), "/dev/zero"]
GIL_WAIT_S = 0.5

IMPLS = {"compiled": _supervise_c, "pure": _supervise_py}
_MEDIANS: dict[tuple[str, str], float] = {}
_MINS: dict[tuple[str, str], float] = {}
_NOTES: dict[str, str] = {}


def _module(impl: str):
    module = IMPLS[impl]
    if module is None:
        pytest.skip("heidi._fast._supervise_c is not built")
    return module


def _record(benchmark, group: str, name: str) -> None:
    if benchmark.stats is not None:
        _MEDIANS[(group, name)] = benchmark.stats.stats.median
        _MINS[(group, name)] = benchmark.stats.stats.min


@pytest.fixture(scope="module", autouse=True)
def ratio_report(request):
    """After the module, print the ratios (and the GIL check) the targets are stated in."""
    _supervise_watchdog.ensure_started()  # forked once per process: not part of any round
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _MEDIANS:
        return
    interleaved = _interleaved_spawn() if ("spawn", "bare") in _MEDIANS else {}
    with capture.global_and_fixture_disabled():
        _write_report(reporter, interleaved)


def _cgroups() -> bool:
    """Whether stages get cgroups here (HEIDI_CGROUP unset)."""
    saved = os.environ.pop(_supervise_cgroup.ENV, None)
    try:
        return _supervise_cgroup.containment().kind == "cgroup"
    finally:
        if saved is not None:
            os.environ[_supervise_cgroup.ENV] = saved


def _containment(name: str) -> None:
    """Rows named "...+cgroup" run their stages in cgroups, the others with HEIDI_CGROUP=0
    (the target is stated for the spawn itself; the cgroup rows show what containment adds)."""
    if name.endswith("+cgroup"):
        os.environ.pop(_supervise_cgroup.ENV, None)
    else:
        os.environ[_supervise_cgroup.ENV] = "0"


def _interleaved_spawn(rounds: int = 600) -> dict[str, float]:
    """The same spawns taken in turn, so that load from other processes (which drifts between
    pytest-benchmark's consecutive runs, easily by 10%) weighs on all of them alike: the target
    is judged on these medians."""
    fns = {"bare": _bare_spawn, "bare+capture": _bare_spawn_captured}
    for name, module in IMPLS.items():
        if module is not None:
            fns[name] = lambda run=module.run_supervised: run([TRUE])
            if _cgroups():
                fns[name + "+cgroup"] = fns[name]
    times: dict[str, list[float]] = {name: [] for name in fns}
    saved = os.environ.get(_supervise_cgroup.ENV)
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                _containment(name)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        os.environ.pop(_supervise_cgroup.ENV, None)
        if saved is not None:
            os.environ[_supervise_cgroup.ENV] = saved
    return {name: statistics.median(values) for name, values in times.items()}


def _write_report(reporter, interleaved: dict[str, float]) -> None:
    write = reporter.write_line
    write("")
    write("spawn + reap /bin/true, pytest-benchmark's own runs one after another: median (min), "
          "ratio to bare posix_spawn + waitpid:")
    base, base_min = _MEDIANS.get(("spawn", "bare")), _MINS.get(("spawn", "bare"))
    for name in ("bare", "compiled", "pure", "compiled+cgroup"):
        median, low = _MEDIANS.get(("spawn", name)), _MINS.get(("spawn", name))
        if median is None:
            write(f"  {name:9s} n/a")
            continue
        ratio = median / base if base else float("nan")
        ratio_min = low / base_min if base_min else float("nan")
        write(f"  {name:9s} {median * 1e6:7.1f} us ({low * 1e6:6.1f} us)  "
              f"{ratio:5.2f}x ({ratio_min:4.2f}x)")
    if interleaved:
        base = interleaved["bare"]
        write(f"the same, taken in turn (the target, < {TARGET_OVERHEAD:.2f}x, is judged here):")
        for name, median in interleaved.items():
            ratio = median / base
            verdict = ""
            if name.endswith("+cgroup"):
                verdict = "  (each stage in its own cgroup: mkdir, enter, cpu.stat, rmdir)"
            elif name in IMPLS:
                met = "met" if ratio < TARGET_OVERHEAD else "NOT MET"
                verdict = f"  (target < {TARGET_OVERHEAD:.2f}: {met})" if name == "compiled" \
                    else "  (the pure twin: no target)"
            elif name == "bare+capture":
                verdict = "  (context: own session, /dev/null stdin, a pipe read to its end)"
            write(f"  {name:12s} {median * 1e6:7.1f} us  {ratio:5.2f}x{verdict}")
    write(f"capture of {CAPTURE_BYTES >> 20} MiB through on_output (no-op sink), against bare "
          "Popen + readv into one buffer:")
    base = _MEDIANS.get(("capture", "bare"))
    for name in ("bare", "compiled", "pure"):
        median = _MEDIANS.get(("capture", name))
        if median is None:
            write(f"  {name:9s} n/a")
            continue
        ratio = f"  {base / median:5.2f}x of bare reading" if base and name != "bare" else ""
        write(f"  {name:9s} {CAPTURE_BYTES / median / 1e6:8.0f} MB/s{ratio}")
    write(f"another Python thread while run_supervised waits {GIL_WAIT_S} s for `sleep`:")
    for name in ("alone", "compiled", "pure"):
        if name in _NOTES:
            write(f"  {name:9s} {_NOTES[name]}")


# ---- spawn + reap /bin/true --------------------------------------------------------------------

def _bare_spawn() -> None:
    pid = os.posix_spawn(TRUE, [TRUE], os.environ)
    os.waitpid(pid, 0)


def _bare_spawn_captured() -> None:
    """Context for the ratio, not the target's baseline: what spawning with supervision's bare
    necessities costs (own session, stdin /dev/null, output through a pipe read to EOF)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.posix_spawn(TRUE, [TRUE], os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_DUP2, write_fd, 2)])
    finally:
        os.close(write_fd)
    try:
        while os.read(read_fd, 65536):
            pass
    finally:
        os.close(read_fd)
    os.waitpid(pid, 0)


@pytest.mark.benchmark(group="spawn+reap /bin/true")
@pytest.mark.parametrize("impl", ["bare", "compiled", "pure", "compiled+cgroup"])
def test_spawn_true(benchmark, impl, monkeypatch):
    if impl == "bare":
        fn = _bare_spawn
    else:
        if impl.endswith("+cgroup") and not _cgroups():
            pytest.skip("no stage cgroups here")
        if impl.endswith("+cgroup"):
            monkeypatch.delenv(_supervise_cgroup.ENV, raising=False)
        else:
            monkeypatch.setenv(_supervise_cgroup.ENV, "0")
        run = _module(impl.split("+")[0]).run_supervised

        def fn():
            result = run([TRUE])
            assert result.exit_code == 0
    benchmark.pedantic(fn, rounds=400, warmup_rounds=30)
    _record(benchmark, "spawn", impl)


# ---- 1 GiB of output ---------------------------------------------------------------------------

def _bare_capture() -> None:
    # The same 1 MiB pipe run_supervised gives a chatty stage.
    proc = subprocess.Popen(CAPTURE_ARGV, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            pipesize=_supervise_core.PIPE_SIZE)
    fd = proc.stdout.fileno()
    buf = bytearray(_supervise_core.PIPE_SIZE)  # the fastest Python read loop: no copies
    total = 0
    while True:
        size = os.readv(fd, (buf,))
        if not size:
            break
        total += size
    proc.stdout.close()
    proc.wait()
    assert total == CAPTURE_BYTES


@pytest.mark.benchmark(group="capture 1 GiB")
@pytest.mark.parametrize("impl", ["bare", "compiled", "pure"])
def test_capture_1gib(benchmark, impl):
    if impl == "bare":
        fn = _bare_capture
    else:
        run = _module(impl).run_supervised

        def fn():
            result = run(CAPTURE_ARGV, on_output=lambda chunk: None)
            assert result.ok and result.output_bytes == CAPTURE_BYTES
    benchmark.pedantic(fn, rounds=2, warmup_rounds=0)
    _record(benchmark, "capture", impl)


# ---- the GIL while waiting -----------------------------------------------------------------------

def _spin_during(fn) -> tuple[int, float]:
    count = 0
    done = threading.Event()

    def spin():
        nonlocal count
        while not done.is_set():
            count += 1

    thread = threading.Thread(target=spin)
    t0 = time.perf_counter()
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return count, time.perf_counter() - t0


@pytest.mark.benchmark(group="GIL while waiting")
@pytest.mark.parametrize("impl", ["alone", "compiled", "pure"])
def test_thread_runs_while_waiting(benchmark, impl):
    if impl == "alone":
        work = lambda: time.sleep(GIL_WAIT_S)  # noqa: E731 - the other thread has the GIL to itself
    else:
        run = _module(impl).run_supervised
        work = lambda: run(["sleep", str(GIL_WAIT_S)])  # noqa: E731
    counts = []
    benchmark.pedantic(lambda: counts.append(_spin_during(work)), rounds=3, warmup_rounds=0)
    count, seconds = sorted(counts, key=lambda cs: cs[0] / cs[1])[1]  # the median round
    benchmark.extra_info["thread_iterations"] = count
    alone = _NOTES.get("_alone_rate")
    rate = count / seconds
    if impl == "alone":
        _NOTES["_alone_rate"] = rate
        _NOTES[impl] = f"{count:>10,} iterations in {seconds:.2f} s"
    else:
        share = f" = {rate / alone:.0%} of its speed alone" if alone else ""
        _NOTES[impl] = f"{count:>10,} iterations in {seconds:.2f} s{share}"
