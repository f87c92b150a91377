"""Start-up time of the CLI (design.md §10): `heidi version` beside the bare interpreter start it
cannot avoid, the frozen one-file / one-folder binaries when packaging/build.sh made them, and
the portable (glibc 2.31) ones when packaging/build-portable.sh wrote them to dist-portable/:

  HEIDI_PORTABLE_DIST=dist-portable bash packaging/build-portable.sh
Run: python -m pytest bench/bench_startup.py --benchmark-only -q -s
Targets: frozen onedir well under 100 ms, onefile well under 200 ms; `heidi status` and `heidi tick`
with nothing to do (a completed run) at most 3x the bare interpreter (issue #11). Printed, not
asserted. heidi's bytecode is cached (in a temporary PYTHONPYCACHEPREFIX, never in the checkout)
as it is for an installed heidi, even where PYTHONDONTWRITEBYTECODE is set.
"""
from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEFILE = os.path.join(ROOT, "dist", "heidi")
ONEDIR = os.path.join(ROOT, "dist", "heidi-dir", "heidi")
PORTABLE = os.environ.get("HEIDI_PORTABLE_DIST", os.path.join(ROOT, "dist-portable"))
_SCRATCH = tempfile.mkdtemp(prefix="heidi-bench-startup-")
atexit.register(shutil.rmtree, _SCRATCH, True)
ENV = {k: v for k, v in os.environ.items()
       if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith(("HEIDI_", "RUN_ID", "OUT_DIR", "ROUNDS"))}
ENV.update(PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=os.path.join(_SCRATCH, "pycache"))
DONE_RUN = os.path.join(_SCRATCH, "done")  # a completed mock run: a tick there has nothing to do
COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "python -m heidi version": [sys.executable, "-m", "heidi", "version"],
    "python -m heidi status": [sys.executable, "-m", "heidi", "status",
                               "--out-dir", "/nonexistent-heidi-bench"],
    "python -m heidi status (a run)": [sys.executable, "-m", "heidi", "status", "--out-dir", DONE_RUN],
    "python -m heidi tick (nothing to do)": [sys.executable, "-m", "heidi", "tick", "--out-dir", DONE_RUN],
    "frozen onefile: heidi version": [ONEFILE, "version"],
    "frozen onedir: heidi version": [ONEDIR, "version"],
    "portable onefile: heidi version": [os.path.join(PORTABLE, "heidi"), "version"],
    "portable onedir: heidi version": [os.path.join(PORTABLE, "heidi-dir", "heidi"), "version"],
}
TARGETS = {"onefile": 0.200, "onedir": 0.100}
RATIO_TARGETS = {"python -m heidi status": 3.0, "python -m heidi status (a run)": 3.0,
                 "python -m heidi tick (nothing to do)": 3.0}
_MEDIANS: dict[str, float] = {}


def _done_run() -> None:
    if not os.path.exists(DONE_RUN):
        subprocess.run([sys.executable, "-m", "heidi", "run", "--out-dir", DONE_RUN],
                       env={**ENV, "HEIDI_MOCK_SUBPROCESSES": "1", "ROUNDS": "2"}, check=True,
                       stdout=subprocess.DEVNULL)


def _run(argv: list[str]) -> None:
    subprocess.run(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_startup(benchmark, name):
    argv = COMMANDS[name]
    if not os.path.exists(argv[0]):
        pytest.skip(f"{argv[0]} not built (packaging/build.sh with HEIDI_ONEDIR=1, or "
                    "packaging/build-portable.sh)")
    if DONE_RUN in argv:
        _done_run()
    benchmark.group = "start-up"
    benchmark.pedantic(_run, args=(argv,), rounds=15, iterations=1, warmup_rounds=2)
    # interleave-free but same-run median, for the ratio report below
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        _run(argv)
        times.append(time.perf_counter() - t0)
    _MEDIANS[name] = statistics.median(times)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not _MEDIANS:
        return
    floor = _MEDIANS.get("python -c pass (floor)")
    print("\nstart-up, median of 15 runs:")
    for name, value in _MEDIANS.items():
        ratio = f"  {value / floor:.2f}x the bare interpreter" if floor else ""
        layout = name.split(":")[0].split()[-1]
        target = TARGETS.get(layout) if not name.startswith("python") else None
        verdict = (f"  (target < {target * 1000:.0f} ms: {'met' if value < target else 'NOT MET'})"
                   if target else "")
        most = RATIO_TARGETS.get(name)
        if most and floor:
            verdict = f"  (target <= {most:.0f}x: {'met' if value / floor <= most else 'NOT MET'})"
        print(f"  {name:38s} {value * 1000:7.1f} ms{ratio}{verdict}")
    # The portable build against today's build, layout by layout: no slower is the goal.
    for layout in TARGETS:
        frozen = _MEDIANS.get(f"frozen {layout}: heidi version")
        portable = _MEDIANS.get(f"portable {layout}: heidi version")
        if frozen and portable:
            print(f"  portable / frozen {layout}: {portable / frozen:.2f}x")
    if floor:
        print(interleaved_ratios())


def interleaved_ratios(rounds: int = 15) -> str:
    """The ratio rows again, measured interleaved (floor, status, tick, floor, ...): medians."""
    names = ["python -c pass (floor)", *RATIO_TARGETS]
    _done_run()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            _run(COMMANDS[name])
            samples[name].append(time.perf_counter() - t0)
    floor = statistics.median(samples[names[0]])
    rows = [f"interleaved, median of {rounds}:"]
    for name in names[1:]:
        value = statistics.median(samples[name])
        rows.append(f"  {name:38s} {value * 1000:7.1f} ms  {value / floor:.2f}x the bare interpreter "
                    f"({floor * 1000:.1f} ms; target <= {RATIO_TARGETS[name]:.0f}x: "
                    f"{'met' if value / floor <= RATIO_TARGETS[name] else 'NOT MET'})")
    return "\n".join(rows)
