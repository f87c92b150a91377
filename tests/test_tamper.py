"""A journal changed outside heidi is never built upon (issue #9 item 2): `heidi tick`, the
Python API holding the run and a real `heidi daemon` each stop with one line, append nothing, and
`heidi verify` names the line and reports a state.json that disagrees with the journal.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import orjson
import pytest

from heidi.config import Config
from heidi.journal import JournalChanged
from heidi.machine import Machine, mock_stage

from cli_helpers import clean_env, heidi_cli

CHANGED = re.compile(r"^heidi: journal changed outside heidi at line (\d+); see `heidi verify`")


def _cli(out: str, *args: str) -> subprocess.CompletedProcess:
    return heidi_cli(*args, "--out-dir", out, HEIDI_MOCK_SUBPROCESSES="1", ROUNDS="3",
                     HEIDI_FSYNC="0")


def _lines(out: str) -> list[bytes]:
    with open(os.path.join(out, "events.jsonl"), "rb") as fh:
        return fh.readlines()


def _write(out: str, lines: list[bytes]) -> None:
    with open(os.path.join(out, "events.jsonl"), "wb") as fh:
        fh.writelines(lines)


def _journal_bytes(out: str) -> bytes:
    with open(os.path.join(out, "events.jsonl"), "rb") as fh:
        return fh.read()


@pytest.fixture
def run(tmp_path):
    """A run ticked a few transitions: 2 + 3 * 3 + ... lines in its journal."""
    out = str(tmp_path / "out")
    assert _cli(out, "start").returncode == 0
    proc = _cli(out, "tick", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(_lines(out)) == 11
    return out


def _delete(lines):
    del lines[5]


def _edit_same_size(lines):
    # the same length, so neither the size nor the last line tells: only the chain does
    lines[4] = lines[4].replace(b'"level":"info"', b'"level":"warn"')
    assert b'"level":"warn"' in lines[4]


def _edit_longer(lines):
    lines[6] = lines[6].replace(b'"message":"', b'"message":"edited ')


def _swap(lines):
    lines[3], lines[4] = lines[4], lines[3]


def _edit_last(lines):
    lines[-1] = lines[-1].replace(b'"message":"', b'"message":"X')


def _cut_tail(lines):
    del lines[-2:]


def _foreign_line(lines):
    event = orjson.loads(lines[-1])
    event["message"] = "written by someone else"
    lines.append(orjson.dumps(event) + b"\n")  # prev_hash is not the last line's hash


def _foreign_garbage(lines):
    lines.append(b"hello from another process\n")


TAMPERING = {"delete a middle line": (_delete, 6), "edit a middle line, same size": (_edit_same_size, 6),
             "edit a middle line, longer": (_edit_longer, 8), "swap two lines": (_swap, 4),
             "edit the last line": (_edit_last, 11), "cut the tail": (_cut_tail, 10),
             "append a foreign event": (_foreign_line, 12),
             "append a foreign line": (_foreign_garbage, 12)}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_tick_refuses_a_changed_journal(run, name):
    damage, line_no = TAMPERING[name]
    lines = _lines(run)
    damage(lines)
    _write(run, lines)
    before = _journal_bytes(run)
    state_before = open(os.path.join(run, "state.json"), "rb").read()
    for command in (("tick",), ("run",), ("pause",)):
        proc = _cli(run, *command)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        match = CHANGED.match(proc.stderr)
        assert match, proc.stderr
        assert int(match.group(1)) == line_no, proc.stderr
    # nothing appended past it, and state.json untouched
    assert _journal_bytes(run) == before
    assert open(os.path.join(run, "state.json"), "rb").read() == state_before
    proc = _cli(run, "verify")
    assert proc.returncode == 1


def test_torn_tail_is_not_tampering(run):
    with open(os.path.join(run, "events.jsonl"), "ab") as fh:
        fh.write(b'{"event_version":"1.0","ts":"2026-02')
    proc = _cli(run, "tick")
    assert (proc.returncode, proc.stderr) == (0, "")
    kinds = [orjson.loads(line)["event_type"] for line in _lines(run)]
    assert "journal_repaired" in kinds and os.path.exists(os.path.join(run, "events.jsonl.torn-1"))
    assert _cli(run, "verify").returncode == 0


def test_state_json_behind_the_journal_is_caught_up_not_refused(run):
    state_path = os.path.join(run, "state.json")
    old = open(state_path, "rb").read()
    assert _cli(run, "tick").returncode == 0
    with open(state_path, "wb") as fh:
        fh.write(old)  # as after a power loss: state.json older than the journal
    proc = _cli(run, "verify")
    assert proc.returncode == 0, proc.stdout
    assert "behind the journal" in proc.stdout
    proc = _cli(run, "tick")
    assert (proc.returncode, proc.stderr) == (0, "")
    events = [orjson.loads(line) for line in _lines(run)]
    assert not [e for e in events if e["event_type"] == "state_recovered"]  # merely behind
    proc = _cli(run, "verify", "--json")
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["state"] == "matches"


@pytest.mark.parametrize("field,value", [("current_round", 3), ("counters", {"samples": 10**6}),
                                         ("status", "completed")])
def test_verify_reports_a_state_json_that_disagrees(run, field, value):
    state_path = os.path.join(run, "state.json")
    state = orjson.loads(open(state_path, "rb").read())
    state[field] = value
    with open(state_path, "wb") as fh:
        fh.write(orjson.dumps(state))
    proc = _cli(run, "verify")
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"state.json disagrees with the journal: {field} is "), proc.stdout
    proc = _cli(run, "verify", "--json")
    report = orjson.loads(proc.stdout)
    assert proc.returncode == 1 and report["ok"] is False and report["state"] == "disagrees"


# -- a damaged state.json: a cache, never acted on and never a crash -----------------------------

def _state_with(**changes):
    def write(path):
        state = orjson.loads(open(path, "rb").read())
        for key, value in changes.items():
            if value is _DROP:
                del state[key]
            else:
                state[key] = value
        os.unlink(path)
        with open(path, "wb") as fh:
            fh.write(orjson.dumps(state))
    return write


def _bytes(data: bytes):
    def write(path):
        os.unlink(path)
        with open(path, "wb") as fh:
            fh.write(data)
    return write


def _replace_by(make):
    def write(path):
        os.unlink(path)
        make(path)
    return write


_DROP = object()
DAMAGE = {
    "empty object": (_bytes(b"{}"), "not a heidi state: no 'run_id'"),
    "a list": (_bytes(b"[1]"), "not a JSON object"),
    "cut short": (_bytes(b'{"run_id": "run_'), "not valid JSON"),
    "not UTF-8": (_bytes(b'{"run_id": "\xff"}'), "not valid JSON"),
    "nested deeper than the parser goes": (_bytes(b"[" * 100000), "not valid JSON"),
    "a key missing": (_state_with(paused=_DROP), "no 'paused'"),
    "round a string": (_state_with(current_round="2"), "'current_round' is '2', not a whole number"),
    "negative round": (_state_with(current_round=-1), "'current_round' is -1, not a whole number"),
    "unknown state": (_state_with(state="NOPE"), "'state' is 'NOPE', not one of IDLE"),
    "counters not numbers": (_state_with(counters={"samples": "many"}), "'counters' is"),
    "usage a list": (_state_with(usage=[1]), "'usage' is [1], not an object of numbers"),
    "journal head of the wrong kind": (_state_with(journal={"events": "11", "bytes": 1, "head": None}),
                                       "'journal' is"),
    "a directory": (_replace_by(os.mkdir), "not a regular file"),
    "a FIFO": (_replace_by(os.mkfifo), "not a regular file"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_state_json_is_shown_from_the_journal_and_rebuilt(run, name):
    """Whatever is at state.json: status shows the run from the journal (exit 0, a note), verify
    says state.json is wrong (exit 1), and the next tick keeps the damaged copy aside, rebuilds
    state.json from the journal and goes on -- one line or none, never a traceback or a hang."""
    damage, reason = DAMAGE[name]
    state_path = os.path.join(run, "state.json")
    damage(state_path)
    journal = _journal_bytes(run)
    proc = _cli(run, "status")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    first, note = proc.stdout.splitlines()[:2]
    assert first.startswith("run run_") and "state EVALUATING, round 1/3" in first, proc.stdout
    assert note.startswith(f"note: {state_path}: ") and reason in note, note
    assert note.endswith("shown from the journal (11 events); the next tick, `heidi run` or daemon "
                         "rebuilds it")
    view = orjson.loads(_cli(run, "status", "--json").stdout)
    assert (view["round"], view["state"], view["state_note"]) == (1, "EVALUATING", note[6:])
    proc = _cli(run, "verify")
    assert proc.returncode == 1 and proc.stderr == ""
    assert proc.stdout.startswith("state.json disagrees with the journal: ") and reason in proc.stdout
    assert _journal_bytes(run) == journal  # nothing read-only wrote anything
    proc = _cli(run, "tick")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert os.path.lexists(state_path + ".corrupt-1")  # the damaged one, kept aside
    events = [orjson.loads(line) for line in _lines(run)]
    assert [e["event_type"] for e in events[11:13]] == ["state_recovered", "stage_start"]
    assert _cli(run, "verify").returncode == 0
    view = orjson.loads(_cli(run, "status", "--json").stdout)
    assert view["state_note"] is None and view["journal"]["events"] == len(events)


def test_a_missing_state_json_is_shown_from_the_journal(run):
    os.unlink(os.path.join(run, "state.json"))
    proc = _cli(run, "status")
    assert proc.returncode == 0 and "state EVALUATING, round 1/3" in proc.stdout
    assert proc.stdout.splitlines()[1] == ("note: no state.json; shown from the journal (11 events); "
                                           "the next tick, `heidi run` or daemon writes it again")
    assert not os.path.exists(os.path.join(run, "state.json"))


def test_a_state_json_behind_is_shown_caught_up(run):
    """After a power loss state.json may be older than the journal: status shows the journal's
    events it lacks (read only); while a process holds the run this is only the instant between
    its append and its write, and no note is shown."""
    state_path = os.path.join(run, "state.json")
    old = open(state_path, "rb").read()
    assert _cli(run, "tick", "--steps", "2").returncode == 0
    now = orjson.loads(_cli(run, "status", "--json").stdout)
    with open(state_path, "wb") as fh:
        fh.write(old)
    view = orjson.loads(_cli(run, "status", "--json").stdout)
    events = now["journal"]["events"]
    assert events > 11
    assert view["state_note"] == (f"state.json is behind the journal; shown from the journal "
                                  f"({events} events); the next tick, `heidi run` or daemon "
                                  "catches it up")
    assert {k: view[k] for k in ("state", "round", "stage", "journal", "usage")} == {
        k: now[k] for k in ("state", "round", "stage", "journal", "usage")}
    assert open(state_path, "rb").read() == old
    from heidi.lock import RunLock
    held = RunLock(os.path.join(run, "heidi.lock")).acquire()  # as a holder between its writes
    try:
        view = orjson.loads(_cli(run, "status", "--json").stdout)
    finally:
        held.release()
    assert view["holder_pid"] == os.getpid() and view["state_note"] is None
    assert view["journal"] == now["journal"]


def test_a_changed_journal_behind_a_missing_state_json_is_one_line(run):
    lines = _lines(run)
    _edit_same_size(lines)
    _write(run, lines)
    os.unlink(os.path.join(run, "state.json"))
    proc = _cli(run, "status")
    assert proc.returncode == 1 and proc.stdout == ""
    assert CHANGED.match(proc.stderr) and proc.stderr.count("\n") == 1, proc.stderr


# -- a process that holds the run -----------------------------------------------------------

def _config(out: str) -> Config:
    return Config.load(None, environ={}, overrides={
        "OUT_DIR": out, "ROUNDS": 3, "HEIDI_MOCK_SUBPROCESSES": True, "HEIDI_FSYNC": False})


@pytest.mark.parametrize("name,line_no", [("append a foreign event", 9), ("append a foreign line", 9),
                                          ("cut the tail", 7), ("delete a middle line", 6)])
def test_holder_refuses_to_append_after_a_change(tmp_path, name, line_no):
    damage, _ = TAMPERING[name]
    out = str(tmp_path / "out")
    machine = Machine(_config(out), stage_runner=mock_stage).open()
    try:
        machine.start()
        machine.tick()
        machine.tick()
        lines = _lines(out)
        damage(lines)
        if name.startswith("append"):
            with open(os.path.join(out, "events.jsonl"), "ab") as fh:  # in place: an append
                fh.write(lines[-1])
        else:
            _write(out, lines)
        before = _journal_bytes(out)
        with pytest.raises(JournalChanged) as info:
            machine.tick()
        assert info.value.line_no == line_no  # 8 lines before the change
        with pytest.raises(JournalChanged):
            machine.tick()  # and it stays refused
    finally:
        machine.close()
    assert _journal_bytes(out) == before


def test_core_between_ticks_notices_a_foreign_append(tmp_path):
    import heidi
    out = str(tmp_path / "out")
    core = heidi.Core()
    core.init(None, OUT_DIR=out, ROUNDS=3, HEIDI_MOCK_SUBPROCESSES=1, HEIDI_FSYNC=0)
    core.start()
    core.tick()
    with open(os.path.join(out, "events.jsonl"), "ab") as fh:
        fh.write(b'{"not":"an event"}\n')
    before = _journal_bytes(out)
    with pytest.raises(JournalChanged):
        core.tick()
    assert _journal_bytes(out) == before


def test_daemon_stops_on_a_foreign_append_while_it_holds_the_run(tmp_path):
    out = str(tmp_path / "out")
    err_path = str(tmp_path / "daemon.err")
    env = clean_env(HEIDI_MOCK_SUBPROCESSES="1", HEIDI_MODE="collect", ROUNDS="2", HEIDI_FSYNC="0")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "heidi", "daemon", "--port", "0",
                                 "--out-dir", out], env=env, cwd=str(tmp_path),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        # collect mode: the run waits in IDLE for train-now, the daemon holding it
        deadline = time.monotonic() + 20
        while True:
            state_path = os.path.join(out, "state.json")
            if os.path.exists(state_path):
                state = orjson.loads(open(state_path, "rb").read())
                if state["status"] == "idle":
                    break
            assert proc.poll() is None, open(err_path).read()
            assert time.monotonic() < deadline, "the daemon never reached IDLE"
            time.sleep(0.05)
        count = len(_lines(out))
        with open(os.path.join(out, "events.jsonl"), "ab") as fh:
            fh.write(b'{"written":"by another process"}\n')
        before = _journal_bytes(out)
        queued = _cli_env(out, env, "pause")
        assert queued.returncode == 0 and "requested" in queued.stdout, queued.stderr
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stderr = open(err_path).read()
    assert code == 1, stderr
    assert f"journal changed outside heidi at line {count + 1}; see `heidi verify`" in stderr
    assert _journal_bytes(out) == before  # nothing chained past the foreign line


def test_daemon_refuses_to_take_a_changed_run(run, tmp_path):
    lines = _lines(run)
    _edit_same_size(lines)
    _write(run, lines)
    env = clean_env(HEIDI_MOCK_SUBPROCESSES="1", ROUNDS="3", HEIDI_FSYNC="0")
    proc = subprocess.run([sys.executable, "-m", "heidi", "daemon", "--port", "0", "--out-dir", run],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert CHANGED.match(proc.stderr.splitlines()[-1]), proc.stderr


def _cli_env(out: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", *args, "--out-dir", out], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_touched_journal_is_checked_once_then_trusted_again(run, monkeypatch):
    """Only the mtime changed (a backup tool, `touch`): the whole chain is checked, found intact,
    and the new mtime recorded, so the next tick is O(1) again."""
    import heidi.recovery as recovery_mod
    journal = os.path.join(run, "events.jsonl")
    os.utime(journal, ns=(0, 10**18))
    calls = []
    real = recovery_mod._verify_upto
    monkeypatch.setattr(recovery_mod, "_verify_upto", lambda *a: calls.append(1) or real(*a))
    cfg = _config(run)
    for expected in (1, 1):
        with Machine(cfg, stage_runner=mock_stage) as machine:
            assert machine.state["journal"]["mtime_ns"] == os.stat(journal).st_mtime_ns
        assert len(calls) == expected
    assert _cli(run, "verify", "--json").returncode == 0


def test_a_journal_swapped_during_a_stage_is_noticed_by_the_next_tick(tmp_path):
    """The swap lands between the tick's check and its append: the tick's lines go to the file
    it holds open, and the next tick of the same process (Core's way: release, open again)
    must not take the swapped-in file for the one it wrote."""
    out = str(tmp_path / "out")
    journal = os.path.join(out, "events.jsonl")

    def swapping_stage(ctx, stage, round_):
        copy = journal + ".copy"
        with open(journal, "rb") as src, open(copy, "wb") as dst:
            dst.write(src.read())
        os.rename(copy, journal)  # same bytes, another file
        return mock_stage(ctx, stage, round_)

    cfg = Config.load(None, environ={}, overrides={"OUT_DIR": out, "ROUNDS": 2,
                                                   "HEIDI_MOCK_SUBPROCESSES": True,
                                                   "HEIDI_FSYNC": False})
    machine = Machine(cfg, stage_runner=mock_stage).open()
    machine.start()
    machine.release()
    machine.stage_runner = swapping_stage
    machine.open(create=False)
    assert machine.tick()
    machine.release()
    before = _journal_bytes(out)
    machine.stage_runner = mock_stage
    with pytest.raises(JournalChanged):
        machine.open(create=False)  # the file at the path lacks the lines state.json records
    machine.close()
    assert _journal_bytes(out) == before
