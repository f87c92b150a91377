"""Many processes on one run, and processes killed at random instants (design.md §4, §9).

The run lock makes concurrent `heidi tick`s take turns (the others exit 75, silently), and the
journal + state.json survive SIGKILL anywhere: the next process rebuilds, repairs or re-runs, and
the run ends exactly as a sequential, never-killed run would.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from heidi.config import Config
from heidi.errors import RunLocked
from heidi.journal import read_events, verify_run
from heidi.lock import lock_holder
from heidi.status import read_state

from helpers_loop import ENV_SETTINGS, FULL_STAGES, REPO, STAGE_EVENTS

RECOVERY_EVENTS = ("state_recovered", "journal_repaired")


def heidi_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_SETTINGS}
    env.update(PYTHONPATH=REPO, HEIDI_MOCK_SUBPROCESSES="1")
    env.update(extra)
    return env


def heidi_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "heidi", *args]


# `python -m heidi` on a slow disk: every write and rename takes a further 2 ms, so that the
# few-microsecond gaps between two appends, or between two renames, are wide enough for a random
# kill to land in them (pure-Python twins, whose syscalls go through the os module).
_SLOW_IO = """
import os, runpy, sys, time
_write, _rename = os.write, os.rename
def write(fd, data):
    n = _write(fd, data)
    time.sleep(0.002)
    return n
def rename(src, dst, **kw):
    _rename(src, dst, **kw)
    time.sleep(0.002)
os.write, os.rename = write, rename
sys.argv[0] = "heidi"
runpy.run_module("heidi", run_name="__main__", alter_sys=True)
"""


def slow_heidi_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", _SLOW_IO, *args]


def expected_full(rounds: int) -> list[tuple[str, int, str]]:
    """(event_type, round, stage) of a sequential full-mode run."""
    seq = [("pipeline_start", 0, "pipeline"), ("round_start", 1, "pipeline")]
    for r in range(1, rounds + 1):
        if r > 1:
            seq.append(("round_start", r, "pipeline"))
        seq += [(kind, r, stage) for stage in FULL_STAGES for kind in STAGE_EVENTS]
    return seq + [("pipeline_complete", rounds, "pipeline")]


def shape(events: list[dict]) -> list[tuple[str, int, str]]:
    return [(e["event_type"], e["round"], e["stage"]) for e in events]


def without_recovery(events: list[dict]) -> list[dict]:
    """The events minus what crash recovery adds: rebuild/repair notes, and each interrupted
    attempt of a stage (its stage_start, followed by stage_interrupted when it runs again).

    A holder killed between a stage's script_success and its stage_end leaves a succeeded but
    unfinished stage, which the next holder runs again too: such an attempt is
    stage_start + script_success.
    """
    kept: list[dict] = []
    for e in events:
        kind = e["event_type"]
        if kind in RECOVERY_EVENTS:
            continue
        if kind == "stage_interrupted":
            attempt = kept.pop()
            if attempt["event_type"] == "script_success":
                assert (attempt["stage"], attempt["round"]) == (e["stage"], e["round"]), (attempt, e)
                attempt = kept.pop()
            assert (attempt["event_type"], attempt["stage"], attempt["round"]) == (
                "stage_start", e["stage"], e["round"]), (attempt, e)
            continue
        kept.append(e)
    return kept


def run_cli(out_dir: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(heidi_argv(*args, "--out-dir", out_dir), env=env, capture_output=True,
                          timeout=120)


def verify_cli(out_dir: str, env: dict[str, str]) -> dict:
    proc = run_cli(out_dir, "verify", "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return orjson.loads(proc.stdout)


# -- eight tick loops on one run -------------------------------------------------------------

def test_eight_concurrent_tick_loops(tmp_path):
    rounds = 5
    out_dir = str(tmp_path / "out")
    env = heidi_env(ROUNDS=str(rounds), HEIDI_FSYNC="1")
    assert run_cli(out_dir, "start", env=env).returncode == 0
    state_path = os.path.join(out_dir, "state.json")
    results: list[tuple[int, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def loop() -> None:
        try:
            while time.monotonic() < deadline:
                proc = subprocess.run(heidi_argv("tick", "--out-dir", out_dir), env=env,
                                      capture_output=True, timeout=60)
                with lock:
                    results.append((proc.returncode, proc.stdout, proc.stderr))
                if read_state(state_path)["status"] == "completed":
                    return
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    codes = sorted({code for code, _, _ in results})
    assert set(codes) <= {0, 75}, [r for r in results if r[0] not in (0, 75)]
    for code, out, err in results:
        assert (out, err) == (b"", b""), (code, out, err)  # silent, whether it ticked or not
    successes = sum(1 for code, _, _ in results if code == 0)
    assert successes >= rounds * 4  # every transition took one successful tick
    print(f"\n{len(results)} ticks: {successes} exit 0, {len(results) - successes} exit 75")

    state = read_state(state_path)
    assert (state["status"], state["state"], state["current_round"]) == ("completed", "IDLE", rounds)
    verify_cli(out_dir, env)
    events = list(read_events(os.path.join(out_dir, "events.jsonl")))
    # exactly a sequential run: nothing interleaved, duplicated, recovered or interrupted
    assert shape(events) == expected_full(rounds)
    assert state["journal"]["events"] == len(events)


def test_status_probes_never_make_a_tick_fail(tmp_path):
    """`heidi status` (and the daemon's status) only looks at the lock: a tick, start or stop running
    at the same instant must still get the run, not exit 75 or queue a request nobody applies."""
    cfg = Config.load(None, environ={}, overrides={"OUT_DIR": str(tmp_path / "out"), "ROUNDS": 1000,
                                                   "HEIDI_MOCK_SUBPROCESSES": True, "HEIDI_FSYNC": False})
    lock_path = cfg.lock_path
    prober = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from heidi.lock import lock_holder\n"
        "end = time.monotonic() + 20\n"
        "print('ready', flush=True)\n"
        "while time.monotonic() < end and sys.stdin.readable():\n"
        "    lock_holder(sys.argv[1])\n"), lock_path],
        env=heidi_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        from heidi import core
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(lock_path, "a").close()
        assert prober.stdout.readline() == b"ready\n"
        core.start(cfg)
        for _ in range(300):
            core.tick(cfg)  # RunLocked here is the bug
        assert core.control_action(cfg, "pause")[0] == "applied"
    finally:
        prober.kill()
        prober.wait()
        prober.stdin.close()
        prober.stdout.close()


# -- SIGKILL at random instants --------------------------------------------------------------

def _journal_bytes(out_dir: str) -> bytes:
    try:
        with open(os.path.join(out_dir, "events.jsonl"), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def _completed(out_dir: str) -> bool:
    return b'"event_type":"pipeline_complete"' in _journal_bytes(out_dir)


def _wait_for_holder(proc: subprocess.Popen, lock_path: str, timeout_s: float = 10.0) -> None:
    """Until proc holds the run lock (it is past start-up, in the journal/state code) or exits."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and proc.poll() is None:
        if lock_holder(lock_path) == proc.pid:
            return
        time.sleep(0.0005)


def _kill_at(proc: subprocess.Popen, delay_s: float) -> int:
    time.sleep(delay_s)
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    return proc.returncode


def _check_sequential_after_kills(out_dir: str, rounds: int, env: dict[str, str]) -> list[dict]:
    verify_cli(out_dir, env)
    events = list(read_events(os.path.join(out_dir, "events.jsonl")))
    kinds = [e["event_type"] for e in events]
    assert kinds.count("pipeline_start") == 1 and kinds.count("pipeline_complete") == 1
    assert shape(without_recovery(events)) == expected_full(rounds)
    state = read_state(os.path.join(out_dir, "state.json"))
    assert (state["status"], state["state"], state["current_round"]) == ("completed", "IDLE", rounds)
    assert (state["journal"]["events"], len(events)) == (len(events), state["journal"]["events"])
    return events


def test_sigkill_heidi_run_at_random_instants(tmp_path):
    rng = random.Random(20240229)
    rounds = 4000  # more than 40 launches get through, however fast a tick becomes
    out_dir = str(tmp_path / "out")
    lock_path = os.path.join(out_dir, "heidi.lock")
    env = heidi_env(ROUNDS=str(rounds), HEIDI_FSYNC="0")
    slow_env = dict(env, HEIDI_NO_EXTENSIONS="1")
    kills = launches = 0
    while kills < 40 and not _completed(out_dir):
        launches += 1
        if launches % 2:
            argv, launch_env = slow_heidi_argv("run", "--out-dir", out_dir), slow_env
        else:
            argv, launch_env = heidi_argv("run", "--out-dir", out_dir), env
        proc = subprocess.Popen(argv, env=launch_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if launches % 4 == 0:
                delay = rng.uniform(0, 0.15)  # anywhere from interpreter start-up on
            else:
                _wait_for_holder(proc, lock_path)
                delay = rng.uniform(0, 0.05)
            code = _kill_at(proc, delay)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stderr = proc.stderr.read()
            proc.stderr.close()
        if code == -signal.SIGKILL:
            kills += 1
        else:
            assert (code, stderr) == (0, b""), stderr  # it finished before the kill landed
    # then let it finish (`heidi run` on a completed run would start a new one: check first)
    if not _completed(out_dir):
        proc = run_cli(out_dir, "run", env=env)
        assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr
    # a tick rebuilds state.json if the last kill landed between the journal and the state
    proc = run_cli(out_dir, "tick", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert not os.path.exists(os.path.join(out_dir, "runs"))  # never restarted by mistake
    events = _check_sequential_after_kills(out_dir, rounds, env)
    kinds = [e["event_type"] for e in events]
    print(f"\n{kills} kills in {launches} launches; recovered {kinds.count('state_recovered')}, "
          f"interrupted {kinds.count('stage_interrupted')}, repaired {kinds.count('journal_repaired')}")
    assert kills >= 15


@pytest.mark.parametrize("previous_run", [False, True], ids=["fresh", "archiving"])
def test_sigkill_during_heidi_start(tmp_path, previous_run):
    """`heidi start` killed at random instants (mid-archive too): start + run still finish."""
    rng = random.Random(7 + previous_run)
    rounds = 2
    env = heidi_env(ROUNDS=str(rounds), HEIDI_FSYNC="0")
    slow_env = dict(env, HEIDI_NO_EXTENSIONS="1")
    outcomes = []
    for i in range(6):
        out_dir = str(tmp_path / f"out{i}")
        lock_path = os.path.join(out_dir, "heidi.lock")
        old_id = None
        if previous_run:
            proc = run_cli(out_dir, "run", env=env)
            assert proc.returncode == 0, proc.stderr
            old_id = read_state(os.path.join(out_dir, "state.json"))["run_id"]
        proc = subprocess.Popen(slow_heidi_argv("start", "--out-dir", out_dir), env=slow_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_holder(proc, lock_path)
            # archiving renames 2 files, the start appends 2 events then writes state.json
            outcomes.append(_kill_at(proc, rng.uniform(0, 0.012 if previous_run else 0.008)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # start again: either it starts, or the killed start got far enough that a run is active
        proc = run_cli(out_dir, "start", env=env)
        assert proc.returncode in (0, 1), proc.stderr
        if proc.returncode == 1:
            assert b"already" in proc.stderr, proc.stderr
        proc = run_cli(out_dir, "run", env=env)
        assert (proc.returncode, proc.stderr) == (0, b""), proc.stderr
        events = _check_sequential_after_kills(out_dir, rounds, env)
        runs_dir = os.path.join(out_dir, "runs")
        if previous_run:
            assert os.listdir(runs_dir) == [old_id]
            assert events[0]["run_id"] != old_id
            archived = verify_run(Config(), os.path.join(runs_dir, old_id, "events.jsonl"))
            assert archived[2] == old_id
            old = list(read_events(os.path.join(runs_dir, old_id, "events.jsonl")))
            assert shape(without_recovery(old)) == expected_full(rounds)
        else:
            assert not os.path.exists(runs_dir)
    assert -signal.SIGKILL in outcomes


def test_lock_holder_reads_proc_locks_without_touching_the_lock(tmp_path):
    from heidi.lock import RunLock
    path = str(tmp_path / "heidi.lock")
    assert lock_holder(path) is None  # no file
    open(path, "a").close()
    assert lock_holder(path) is None  # free
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from heidi.lock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(30)\n"), path], env=heidi_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert lock_holder(path) == holder.pid
        with pytest.raises(RunLocked):
            RunLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert lock_holder(path) is None


def test_core_keeps_the_lock_file_open_but_not_the_lock_between_ticks(tmp_path):
    """Core flocks a lock file it keeps open: between ticks another holder can take the run,
    and an OUT_DIR made again meanwhile (a new heidi.lock) is locked afresh, not through the
    old file."""
    import shutil

    import heidi
    from heidi.lock import RunLock
    out = str(tmp_path / "out")
    core = heidi.Core()
    core.init(None, OUT_DIR=out, ROUNDS=2, HEIDI_MOCK_SUBPROCESSES=1, HEIDI_FSYNC=0)
    core.start()
    core.tick()
    lock_path = os.path.join(out, "heidi.lock")
    assert lock_holder(lock_path) is None
    with RunLock(lock_path), pytest.raises(RunLocked):  # another holder, between two ticks
        core.tick()
    core.tick()
    # OUT_DIR moved away and copied back: every file, heidi.lock too, is a new one
    os.rename(out, out + ".old")
    shutil.copytree(out + ".old", out)
    with RunLock(lock_path), pytest.raises(RunLocked):
        core.tick()  # the kept fd names the old heidi.lock, free: not enough
    view = orjson.loads(core.tick())
    assert view["state"] == "EVALUATING" and lock_holder(lock_path) is None
    core.shutdown()
