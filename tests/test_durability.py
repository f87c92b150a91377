"""Durability comes from the journal alone (issue #11 item 1): one fdatasync of events.jsonl per
transition, state.json replaced without any sync, and after a simulated power loss -- state.json
older, empty or gone, the journal cut back to what was last synced -- the run still completes,
verifies, and keeps every event a returned tick reported.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import orjson
import pytest

import heidi
from heidi import control
from heidi import status as status_mod
from heidi._fast import _atomic_py
from heidi.config import Config
from heidi.machine import Machine, check_state_file, mock_stage, verify_run
from heidi.status import read_state

from cli_helpers import clean_env

STAGE_EVENTS = ("stage_start", "script_success", "stage_end")
FULL_STAGES = ("generate", "validate", "train", "eval")


def _config(out: str, rounds: int, fsync: bool = True) -> Config:
    return Config.load(None, environ={}, overrides={
        "OUT_DIR": out, "ROUNDS": rounds, "HEIDI_MOCK_SUBPROCESSES": True, "HEIDI_FSYNC": fsync,
        "RUN_ID": "run_durability"})


def _journal(out: str) -> bytes:
    with open(os.path.join(out, "events.jsonl"), "rb") as fh:
        return fh.read()


class Syncs:
    """Records os.fdatasync / os.fsync calls (and the journal's size at each fdatasync)."""

    def __init__(self, monkeypatch) -> None:
        self.datasyncs: list[int] = []
        self.fsyncs = 0
        self.fail_next = False
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            if self.fail_next:
                self.fail_next = False
                raise PowerLoss("before the journal's fdatasync")
            real_fdatasync(fd)
            self.datasyncs.append(os.fstat(fd).st_size)

        def fsync(fd: int) -> None:
            self.fsyncs += 1

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)


class PowerLoss(Exception):
    pass


def test_one_fdatasync_per_transition_and_no_sync_of_state_json(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    writes: list[str] = []

    def replace_file(path, tmp, data):
        # state.json replaced by the pure twin, whose syscalls are os calls: os.fsync, counted
        # below, is the only way it could be synced (the compiled twin: the strace test below)
        writes.append(path)
        return _atomic_py.replace_file(path, tmp, data)

    monkeypatch.setattr(status_mod._atomic, "replace_file", replace_file)
    with Machine(_config(out, 2), stage_runner=mock_stage) as machine:
        machine.start()
        syncs = Syncs(monkeypatch)
        ticks = 0
        while machine.tick():
            ticks += 1
    assert ticks == 8
    assert len(syncs.datasyncs) == ticks  # one per transition, however many events it wrote
    assert syncs.fsyncs == 0  # neither state.json nor its directory
    assert writes.count(os.path.join(out, "state.json")) == len(writes) >= ticks
    assert syncs.datasyncs[-1] == len(_journal(out))


STRACE = shutil.which("strace")
TICKS_UNDER_STRACE = """
import heidi, sys
core = heidi.Core()
core.init(None, OUT_DIR=sys.argv[1], ROUNDS=2, HEIDI_MOCK_SUBPROCESSES=1, RUN_ID="run_strace")
core.start()
sys.stderr.write("=====TICKS\\n")
for _ in range(8):
    core.tick(1)
sys.stderr.write("=====DONE\\n")
"""


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_the_disk_sees_one_fdatasync_and_no_fsync_per_tick(twin, tmp_path):
    """What the kernel is asked, on the twin under test (compiled: syscalls made in C, which
    no os.* patch sees): per tick one fdatasync, of events.jsonl; state.json put in place
    (rename or exchange) and never fsynced; no fsync of any file or directory."""
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [STRACE, "-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range,rename,renameat,renameat2",
         "-e", "signal=none", "-y", sys.executable, "-c", TICKS_UNDER_STRACE, out],
        capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = proc.stderr.split("=====TICKS")[1].split("=====DONE")[0].splitlines()
    calls = [c for c in calls if "(" in c]
    datasyncs = [c for c in calls if "fdatasync(" in c]
    assert len(datasyncs) == 8 and all("events.jsonl>" in c for c in datasyncs), calls
    assert not [c for c in calls if c.lstrip("[pid0-9 ]").startswith(("fsync(", "sync_file_range("))]
    placed = [c for c in calls if "rename" in c and 'state.json"' in c]
    assert len(placed) == 8, calls
    # the compiled twin swaps state.json in (README "Crash safety"); the pure one renames
    swapped = [c for c in placed if "RENAME_EXCHANGE" in c]
    assert len(swapped) == (8 if twin == "c" else 0), placed
    assert len(calls) == 16, calls


def test_the_lock_file_is_not_rewritten_by_the_same_holder(tmp_path):
    out = str(tmp_path / "out")
    core = heidi.Core()
    core.init(None, OUT_DIR=out, ROUNDS=2, HEIDI_MOCK_SUBPROCESSES=1, HEIDI_FSYNC=0)
    core.start()
    lock = os.path.join(out, "heidi.lock")
    assert open(lock, "rb").read().strip() == str(os.getpid()).encode()
    before = os.stat(lock)
    core.tick()
    core.tick()
    after = os.stat(lock)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)


def test_core_reuses_its_state_while_the_files_are_unchanged(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    core = heidi.Core()
    core.init(None, OUT_DIR=out, ROUNDS=2, HEIDI_MOCK_SUBPROCESSES=1, HEIDI_FSYNC=0)
    core.start()
    core.tick()
    reads: list[str] = []
    real_read = status_mod.read_state
    monkeypatch.setattr("heidi.recovery.read_state", lambda p: reads.append(p) or real_read(p))
    core.tick()
    core.tick()
    assert reads == []  # nothing read back: the state in memory is what is on disk
    # a change on disk (another process's tick) is noticed and read
    with Machine(core.config) as other:
        other.tick()
    reads.clear()
    view = orjson.loads(core.tick())
    assert reads == [core.config.state_path]
    assert (view["round"], view["state"]) == (2, "VALIDATING")  # after the other's eval
    assert check_state_file(core.config.journal_path)[0] == "matches"


def _die(machine: Machine) -> None:
    """The process is gone: its fds close without writing anything it held back."""
    if machine.journal is not None:
        os.close(machine.journal._fd)
        machine.journal._fd = -1
        machine.journal = None
    machine.lock.release()


def _expected(rounds: int) -> list[tuple[str, int, str]]:
    seq = [("pipeline_start", 0, "pipeline"), ("round_start", 1, "pipeline")]
    for r in range(1, rounds + 1):
        if r > 1:
            seq.append(("round_start", r, "pipeline"))
        seq += [(kind, r, stage) for stage in FULL_STAGES for kind in STAGE_EVENTS]
    return seq + [("pipeline_complete", rounds, "pipeline")]


@pytest.mark.parametrize("seed", range(6))
def test_power_loss_at_random_ticks(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    rounds = 4
    out = str(tmp_path / "out")
    cfg = _config(out, rounds)
    syncs = Syncs(monkeypatch)
    real_write = status_mod.StatusWriter.write
    crash_in_state_write = []

    def write(self, state):
        if crash_in_state_write:
            crash_in_state_write.clear()
            raise PowerLoss("before state.json was replaced")
        return real_write(self, state)

    monkeypatch.setattr(status_mod.StatusWriter, "write", write)
    with Machine(cfg, stage_runner=mock_stage) as machine:
        machine.start()
    snapshots = [open(cfg.state_path, "rb").read()]
    reported = _journal(out)  # what every returned tick so far has reported
    losses = 0
    for _ in range(200):
        machine = Machine(cfg, stage_runner=mock_stage).open()
        if machine.state["status"] == "completed":
            machine.close()
            break
        how = rng.choice(["none", "none", "sync", "state"])
        syncs.fail_next = how == "sync"
        if how == "state":
            crash_in_state_write.append(True)
        try:
            machine.tick()
        except PowerLoss:
            _die(machine)
            losses += 1
            # the power goes: unsynced journal bytes are lost, state.json is whatever reached the
            # disk -- the latest, an older copy, an empty file, or none at all
            os.truncate(cfg.journal_path, syncs.datasyncs[-1] if syncs.datasyncs else 0)
            fate = rng.choice(["latest", "older", "empty", "missing"])
            if fate == "older":
                with open(cfg.state_path, "wb") as fh:
                    fh.write(rng.choice(snapshots))
            elif fate == "empty":
                open(cfg.state_path, "wb").close()
            elif fate == "missing" and os.path.exists(cfg.state_path):
                os.unlink(cfg.state_path)
            continue
        machine.close()
        reported = _journal(out)
        assert syncs.datasyncs[-1] == len(reported)  # durable when the tick returned
        snapshots.append(open(cfg.state_path, "rb").read())
    else:
        pytest.fail("the run never completed")
    assert losses >= 3
    final = _journal(out)
    assert final.startswith(reported)  # no event lost that a returned tick had reported
    assert verify_run(cfg)[2] == "run_durability"
    assert check_state_file(cfg.journal_path)[0] == "matches"
    state = read_state(cfg.state_path)
    assert (state["status"], state["current_round"]) == ("completed", rounds)
    events = [orjson.loads(line) for line in final.splitlines()]
    kept = [(e["event_type"], e["round"], e["stage"]) for e in events
            if e["event_type"] not in ("state_recovered", "journal_repaired")]
    assert kept == _expected(rounds)  # a lost transition ran again, once, from scratch


def test_state_json_is_replaced_under_a_umask_that_clears_its_mode(tmp_path):
    path = str(tmp_path / "state.json")
    writer = status_mod.StatusWriter(path)
    old = os.umask(0o277)
    try:
        seen = writer.write({"run_id": "r", "journal": {}})
        seen_again = writer.write({"run_id": "r2", "journal": {}})
    finally:
        os.umask(old)
    st = os.stat(path)
    assert st.st_mode & 0o7777 == 0o600
    assert seen != seen_again == (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
    assert orjson.loads(open(path, "rb").read()) == {"run_id": "r2", "journal": {}}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no tmp file left


def test_a_tmp_file_left_by_a_dead_process_with_the_same_pid_is_replaced(tmp_path):
    path = str(tmp_path / "state.json")
    writer = status_mod.StatusWriter(path)
    with open(writer._tmp_path(), "wb") as fh:
        fh.write(b'{"torn')  # killed between its create and its rename
    writer.write({"run_id": "r", "journal": {}})
    assert orjson.loads(open(path, "rb").read()) == {"run_id": "r", "journal": {}}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_the_view_lists_requests_queued_after_the_holder_looked(tmp_path):
    """A tick's view reuses the listing of control/ it applied requests from only while it is
    under a millisecond old: a request queued later shows in the view."""
    out = str(tmp_path / "out")
    with Machine(_config(out, 2), stage_runner=mock_stage) as machine:
        machine.start()
        machine.tick()
        assert machine.status()["pending_requests"] == []
        control.request(machine.config.control_dir, "pause")
        time.sleep(0.002)
        view = machine.status()
        assert view["pending_requests"] == ["pause"] and view["pause_requested"]
        machine.tick()  # applies it
        assert machine.status()["paused"] and machine.status()["pending_requests"] == []
