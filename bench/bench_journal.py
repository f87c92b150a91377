"""Journal, verify and state-file speed, each measured against the bare syscalls or primitives it
is built on, and compiled twins against their pure-Python twins (design.md §10).

Run: python -m pytest bench/bench_journal.py --benchmark-only -q
After the module a ratio table is printed (medians of the pytest-benchmark rounds):
  (a) JournalWriter.emit vs os.write of a same-size line to an O_APPEND fd, with and without fsync;
  (b) chain.verify_stream (compiled, pure) vs "sha256 + orjson.loads of every line", in MB/s;
  (c) atomic_write of a ~1 KB state (compiled, pure) vs open/write/rename (+ fsync) by hand.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import random
import statistics
import time

import orjson
import pytest

from heidi import journal as journal_mod
from heidi._fast import _atomic_py, _chain_py, _redact_py
from heidi.clock import Clock

try:
    _chain_c = importlib.import_module("heidi._fast._chain_c")
except ImportError:  # reported as n/a; the other rows still run
    _chain_c = None
try:
    _atomic_c = importlib.import_module("heidi._fast._atomic_c")
except ImportError:
    _atomic_c = None
try:
    _redact_c = importlib.import_module("heidi._fast._redact_c")
except ImportError:
    _redact_c = None

RUN = "run_20260220_074538_bench001"
VERIFY_TARGET_MB = 50
MESSAGE = ("Finished train: loss=0.8123 eval_loss=1.2211 tokens/s=15234.2 checkpoint="
           "/home/ml/runs/run_0001/checkpoint-1200")
USAGE = {"memory_mb_delta": 512.25, "cpu_pct": 97.5, "system_mem_available_kb_delta": -524288,
         "system_cpu_pct": 88.0}
STATE = orjson.dumps({
    "run_id": RUN, "status": "running", "state": "FINALIZING", "mode": "full", "current_round": 3,
    "rounds": 10, "run_unit_tests": False, "current_stage": "train", "stage_status": "running",
    "paused": False, "stop_requested": False, "pause_requested": False,
    "counters": {"samples": 1500, "requests": 1520, "tokens_in": 1_234_567, "tokens_out": 765_432},
    "usage": {**USAGE, "wall_ms": 123456.0}, "started_at": "2026-02-20T07:45:38.307Z",
    "updated_at": "2026-02-20T09:12:01.044Z",
    "journal": {"events": 1234, "head": "5" * 64, "bytes": 512_345},
    "last_error": None, "round": 3, "pending_requests": [],
    "note": "x" * 180,
}, option=orjson.OPT_INDENT_2) + b"\n"

_MEDIANS: dict[tuple[str, str], float] = {}
_EXTRA: dict[str, float] = {}
_BIG_JOURNAL: list[tuple[str, int, str]] = []

# -- which implementation -----------------------------------------------------------------------

STACKS = {  # what JournalWriter uses: chain, atomic (write_all) and the redactor
    "compiled": (_chain_c, _atomic_c, _redact_c),
    "pure": (_chain_py, _atomic_py, _redact_py),
}


def _stack(impl: str):
    chain, atomic, redact = STACKS[impl]
    if chain is None or atomic is None or redact is None:
        pytest.skip("compiled heidi._fast twins are not built")
    return chain, atomic, redact


def _record(benchmark, group: str, impl: str) -> None:
    if benchmark.stats is not None:
        _MEDIANS[(group, impl)] = benchmark.stats.stats.median


@pytest.fixture
def writer_for(tmp_path, monkeypatch):
    """A JournalWriter built on the chosen twins, appending to a fresh journal."""
    def make(impl: str, fsync: bool):
        chain, atomic, redact = _stack(impl)
        monkeypatch.setattr(journal_mod, "_chain", chain)
        monkeypatch.setattr(journal_mod, "_atomic", atomic)
        writer = journal_mod.JournalWriter(str(tmp_path / f"events-{impl}.jsonl"), RUN,
                                           clock=Clock(), redact=redact.Redactor(env={}).redact,
                                           fsync=fsync, round=3)
        return writer
    return make


def _sample_line() -> bytes:
    """A line the size emit writes, for the raw baseline."""
    return _chain_py.encode_event("2026-02-20T07:45:38.307Z", RUN, 3, "train", "info", "stage_end",
                                  MESSAGE, {}, USAGE, [], None, "a" * 64)


@pytest.fixture
def raw_fd(tmp_path):
    fd = os.open(tmp_path / "raw.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)


# -- (a) journal append -------------------------------------------------------------------------

G_APPEND = "journal append (fsync off)"
G_APPEND_SYNC = "journal append + fsync"


@pytest.mark.benchmark(group=G_APPEND)
@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_emit(benchmark, writer_for, impl):
    writer = writer_for(impl, fsync=False)
    try:
        benchmark(writer.emit, "stage_end", MESSAGE, stage="train", usage_delta=USAGE)
    finally:
        writer.close()
    _record(benchmark, G_APPEND, f"emit {impl}")


@pytest.mark.benchmark(group=G_APPEND)
def test_raw_append(benchmark, raw_fd):
    line = _sample_line()
    benchmark(os.write, raw_fd, line)
    _record(benchmark, G_APPEND, "raw os.write")


@pytest.mark.benchmark(group=G_APPEND_SYNC)
@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_emit_sync(benchmark, writer_for, impl):
    writer = writer_for(impl, fsync=True)

    def emit_sync():
        writer.emit("stage_end", MESSAGE, stage="train", usage_delta=USAGE)
        writer.sync()
    try:
        benchmark(emit_sync)
    finally:
        writer.close()
    _record(benchmark, G_APPEND_SYNC, f"emit+sync {impl}")


@pytest.mark.benchmark(group=G_APPEND_SYNC)
def test_raw_append_fsync(benchmark, raw_fd):
    line = _sample_line()

    def write_fsync():
        os.write(raw_fd, line)
        os.fsync(raw_fd)
    benchmark(write_fsync)
    _record(benchmark, G_APPEND_SYNC, "raw os.write+fsync")


# -- (b) verify throughput ----------------------------------------------------------------------

G_VERIFY = f"verify {VERIFY_TARGET_MB} MB journal"


@pytest.fixture(scope="module")
def big_journal(tmp_path_factory):
    """A valid ~50 MB journal of varied events, written once with encode_event."""
    path = tmp_path_factory.mktemp("verify") / "events.jsonl"
    rng = random.Random(20260220)
    encode = (_chain_c or _chain_py).encode_event
    kinds = [("generate", "script_success", "success"), ("train", "stage_start", "info"),
             ("train", "stage_end", "info"), ("eval", "stage_end", "warn"),
             ("pipeline", "round_start", "info")]
    prev, size, count = RUN, 0, 0
    target = VERIFY_TARGET_MB * 1_000_000
    with open(path, "wb") as fh:
        while size < target:
            stage, event_type, level = kinds[count % len(kinds)]
            usage = {k: round(v * rng.uniform(0.5, 1.5), 3) for k, v in USAGE.items()}
            line = encode(f"2026-02-20T{7 + count // 3_600_000 % 17:02d}:{count // 60000 % 60:02d}:"
                          f"{count // 1000 % 60:02d}.{count % 1000:03d}Z", RUN, 1 + count // 1000,
                          stage, level, event_type,
                          f"{MESSAGE} step={rng.randrange(10**6)} \"quoted\" ünïcode"
                          [:rng.randrange(40, 160)],
                          {"samples": rng.randrange(1000)}, usage,
                          [f"data/raw_round_{count // 1000}.jsonl"] if count % 3 == 0 else [],
                          None if count % 7 else "exited with code 3", prev)
            fh.write(line)
            prev = hashlib.sha256(line).hexdigest()
            size += len(line)
            count += 1
    _EXTRA["verify_bytes"] = size
    _EXTRA["verify_events"] = count
    _BIG_JOURNAL.append((str(path), count, prev))
    return str(path), count, prev


def _verify_with(module, path: str):
    with open(path, "rb", buffering=0) as fh:
        return module.verify_stream(fh)


def _baseline_hash_and_parse(path: str):
    """The floor: hash and parse every line, nothing else (no schema, no chain, no canonical form)."""
    sha256, loads = hashlib.sha256, orjson.loads
    count, head = 0, None
    with open(path, "rb") as fh:
        for line in fh:
            head = sha256(line).hexdigest()
            loads(line)
            count += 1
    return count, head, None


@pytest.mark.benchmark(group=G_VERIFY)
@pytest.mark.parametrize("impl", ["compiled", "pure", "sha256+orjson baseline"])
def test_verify(benchmark, big_journal, impl):
    path, count, head = big_journal
    if impl == "compiled":
        if _chain_c is None:
            pytest.skip("heidi._fast._chain_c is not built")
        fn = lambda: _verify_with(_chain_c, path)  # noqa: E731
    elif impl == "pure":
        fn = lambda: _verify_with(_chain_py, path)  # noqa: E731
    else:
        fn = lambda: _baseline_hash_and_parse(path)  # noqa: E731
    result = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert result[:2] == (count, head)
    benchmark.extra_info["MB"] = round(_EXTRA["verify_bytes"] / 1e6, 1)
    _record(benchmark, G_VERIFY, impl)


# -- (c) atomic_write of state.json -------------------------------------------------------------

G_ATOMIC = "atomic_write 1 KB (no fsync)"
G_ATOMIC_SYNC = "atomic_write 1 KB (fsync)"


def _raw_replace(path: str, data: bytes, fsync: bool) -> None:
    """The same syscalls atomic_write makes, by hand: open tmp, write, [fsync], close, rename,
    [fsync dir]."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.write(fd, data)
    if fsync:
        os.fsync(fd)
    os.close(fd)
    os.rename(tmp, path)
    if fsync:
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fsync(dfd)
        os.close(dfd)


def _atomic_bench(benchmark, tmp_path, impl: str, fsync: bool, group: str) -> None:
    path = str(tmp_path / "state.json")
    if impl == "raw":
        benchmark(_raw_replace, path, STATE, fsync)
    else:
        module = _atomic_c if impl == "compiled" else _atomic_py
        if module is None:
            pytest.skip("heidi._fast._atomic_c is not built")
        benchmark(module.atomic_write, path, STATE, 0o600, fsync)
    with open(path, "rb") as fh:
        assert fh.read() == STATE
    assert os.listdir(tmp_path) == ["state.json"]
    _record(benchmark, group, impl)


@pytest.mark.benchmark(group=G_ATOMIC)
@pytest.mark.parametrize("impl", ["compiled", "pure", "raw"])
def test_atomic_write(benchmark, tmp_path, impl):
    _atomic_bench(benchmark, tmp_path, impl, False, G_ATOMIC)


@pytest.mark.benchmark(group=G_ATOMIC_SYNC)
@pytest.mark.parametrize("impl", ["compiled", "pure", "raw"])
def test_atomic_write_fsync(benchmark, tmp_path, impl):
    _atomic_bench(benchmark, tmp_path, impl, True, G_ATOMIC_SYNC)


# -- the ratio table ----------------------------------------------------------------------------
# pytest-benchmark runs each variant in its own time slot; on a shared box the load drifts between
# slots. The ratios below are measured interleaved instead (A, B, C, A, B, C, ...), so each pair
# sees the same load; the tables above keep the per-variant detail.

def _interleaved(fns: dict, rounds: int, inner: int) -> dict[str, tuple[float, float]]:
    """name -> (best, median) seconds per call, over `rounds` interleaved batches of `inner` calls."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: (min(v), statistics.median(v)) for name, v in samples.items()}


def _us(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds >= 0.01 else f"{seconds * 1e6:.2f} us"


def _append_fns(tmp: str, fsync: bool) -> tuple[dict, list]:
    fns, writers = {}, []
    line = _sample_line()
    fd = os.open(os.path.join(tmp, f"raw-{fsync}.jsonl"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    writers.append(fd)
    if fsync:
        fns["raw os.write+fsync"] = lambda: (os.write(fd, line), os.fsync(fd))
    else:
        fns["raw os.write"] = lambda: os.write(fd, line)
    saved = journal_mod._chain, journal_mod._atomic
    for impl, (chain, atomic, redact) in STACKS.items():
        if chain is None or atomic is None or redact is None:
            continue
        journal_mod._chain, journal_mod._atomic = chain, atomic
        try:
            w = journal_mod.JournalWriter(os.path.join(tmp, f"ev-{impl}-{fsync}.jsonl"), RUN,
                                          clock=Clock(), redact=redact.Redactor(env={}).redact,
                                          fsync=fsync, round=3)
        finally:
            journal_mod._chain, journal_mod._atomic = saved
        writers.append(w)

        def call(w=w, chain=chain, atomic=atomic):
            journal_mod._chain, journal_mod._atomic = chain, atomic
            w.emit("stage_end", MESSAGE, stage="train", usage_delta=USAGE)
            w.sync()
        fns[f"emit{'+sync' if fsync else ''} {impl}"] = call
    return fns, writers


def _close(things) -> None:
    for thing in things:
        os.close(thing) if isinstance(thing, int) else thing.close()


def _ratio_lines(tmp: str, journal_info) -> list[str]:
    out = [f"ratios, measured interleaved (best / median per call; state {len(STATE)} B, "
           f"journal line {len(_sample_line())} B):"]
    saved = journal_mod._chain, journal_mod._atomic

    def pair(label: str, res: dict, num: str, den: str, note: str = "") -> None:
        if num not in res or den not in res:
            out.append(f"  {label}: n/a")
            return
        (nb, nm), (db, dm) = res[num], res[den]
        out.append(f"  {label}: {_us(nb)} vs {_us(db)} -> ratio: {nb / db:.2f}x "
                   f"(medians {_us(nm)} vs {_us(dm)}: {nm / dm:.2f}x){note}")

    try:
        if (G_APPEND, "raw os.write") in _MEDIANS:
            fns, things = _append_fns(tmp, False)
            try:
                res = _interleaved(fns, rounds=15, inner=1000)
            finally:
                _close(things)
            pair("emit compiled / raw os.write", res, "emit compiled", "raw os.write")
            pair("emit pure / raw os.write", res, "emit pure", "raw os.write")
            pair("emit pure / emit compiled", res, "emit pure", "emit compiled", "  <- compiled speed-up")
        if (G_APPEND_SYNC, "raw os.write+fsync") in _MEDIANS:
            fns, things = _append_fns(tmp, True)
            try:
                res = _interleaved(fns, rounds=15, inner=10)
            finally:
                _close(things)
            pair("emit+sync compiled / raw os.write+fsync", res, "emit+sync compiled",
                 "raw os.write+fsync")
            pair("emit+sync pure / raw os.write+fsync", res, "emit+sync pure", "raw os.write+fsync")
    finally:
        journal_mod._chain, journal_mod._atomic = saved

    if journal_info is not None and (G_VERIFY, "sha256+orjson baseline") in _MEDIANS:
        path = journal_info[0]
        size = _EXTRA["verify_bytes"]
        fns = {"sha256+orjson baseline": lambda: _baseline_hash_and_parse(path),
               "pure": lambda: _verify_with(_chain_py, path)}
        if _chain_c is not None:
            fns["compiled"] = lambda: _verify_with(_chain_c, path)
        res = _interleaved(fns, rounds=3, inner=1)
        out.append(f"  verify of {size / 1e6:.1f} MB ({int(_EXTRA['verify_events'])} events), "
                   f"best of 3: " + ", ".join(f"{name} {size / best / 1e6:.0f} MB/s"
                                               for name, (best, _) in res.items()))
        pair("verify compiled / sha256+orjson baseline", res, "compiled", "sha256+orjson baseline")
        pair("verify pure / sha256+orjson baseline", res, "pure", "sha256+orjson baseline")
        pair("verify pure / verify compiled", res, "pure", "compiled", "  <- compiled speed-up")

    for group, fsync, rounds, inner in ((G_ATOMIC, False, 15, 200), (G_ATOMIC_SYNC, True, 15, 5)):
        if (group, "raw") not in _MEDIANS:
            continue
        path = os.path.join(tmp, f"state-{fsync}.json")
        fns = {"raw": functools.partial(_raw_replace, path, STATE, fsync),
               "pure": functools.partial(_atomic_py.atomic_write, path, STATE, 0o600, fsync)}
        if _atomic_c is not None:
            fns["compiled"] = functools.partial(_atomic_c.atomic_write, path, STATE, 0o600, fsync)
        res = _interleaved(fns, rounds=rounds, inner=inner)
        label = "fsync" if fsync else "no fsync"
        pair(f"atomic_write compiled / raw ({label})", res, "compiled", "raw")
        pair(f"atomic_write pure / raw ({label})", res, "pure", "raw")
        pair(f"atomic_write pure / compiled ({label})", res, "pure", "compiled",
             "  <- compiled speed-up")
    return out


@pytest.fixture(scope="module", autouse=True)
def ratio_report(request, tmp_path_factory):
    """After the module, measure the pairs interleaved and print the ratio lines (not captured)."""
    yield
    if not _MEDIANS:
        return
    journal_info = _BIG_JOURNAL[0] if _BIG_JOURNAL else None
    lines = _ratio_lines(str(tmp_path_factory.mktemp("ratios")), journal_info)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print("\n".join(lines))
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)
