"""Crash recovery: state.json missing, stale, ahead or damaged, a start or an archive cut short,
a holder that died mid-stage or after the stage's work was journaled, a torn journal line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import orjson
import pytest

import heidi
from heidi.journal import verify_run
from heidi.machine import Machine, mock_stage
from heidi.status import read_state

from helpers_loop import (REPO, STAGE_EVENTS, check_run, events, expected_full, make_config,
                          make_core, stage_block, status, types)

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


class _Crash(BaseException):
    pass


# -- crash recovery --------------------------------------------------------------------------

def test_missing_state_json_is_rebuilt(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    cfg = core.config
    core.start()
    core.tick(max_steps=3)
    before = read_state(cfg.state_path)
    os.unlink(cfg.state_path)
    # readers see the run as the journal tells it (nothing written) until a holder rebuilds it
    seen = status(core)
    assert (seen["run_id"], seen["round"], seen["state"]) == (before["run_id"], 1, before["state"])
    assert seen["state_note"].startswith("no state.json; shown from the journal (")
    assert not os.path.exists(cfg.state_path)
    view = orjson.loads(core.tick())
    assert (view["round"], view["state"]) == (2, "COLLECTING")
    evs = events(cfg)
    idx = [e["event_type"] for e in evs].index("state_recovered")
    assert evs[idx]["level"] == "warn"
    assert [e["event_type"] for e in evs[idx + 1:]] == stage_block(("eval",)) + ["round_start"]
    assert before["run_id"] == view["run_id"]
    check_run(cfg)
    core.tick(max_steps=10)
    kinds = types(cfg)
    kinds.remove("state_recovered")
    assert kinds == expected_full(2)
    check_run(cfg)


def test_state_json_older_than_the_journal_is_caught_up(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    cfg = core.config
    core.start()
    core.tick()
    stale = tmp_path / "state.json.old"
    shutil.copy(cfg.state_path, stale)
    core.tick()  # validate runs; its state.json is then lost (as if the rename never landed)
    shutil.copy(stale, cfg.state_path)
    assert read_state(cfg.state_path)["state"] == "VALIDATING"
    view = orjson.loads(core.tick())
    # caught up: it knows validate ran, so this tick runs train (no duplicated stage); a state
    # that was merely behind is rewritten, nothing journaled (a tick failing on a full disk
    # would otherwise journal it again and again)
    assert view["state"] == "EVALUATING"
    assert "state_recovered" not in types(cfg)
    core.tick(max_steps=20)
    assert types(cfg) == expected_full(2)
    check_run(cfg)


def test_state_json_ahead_of_the_journal_is_refused(tmp_path):
    """A journal cut short (state.json records more events) is not silently replayed."""
    core = make_core(tmp_path, ROUNDS=2)
    cfg = core.config
    core.start()
    core.tick(max_steps=2)
    with open(cfg.journal_path, "rb") as fh:
        lines = fh.readlines()
    with open(cfg.journal_path, "wb") as fh:
        fh.writelines(lines[:-3])
    with pytest.raises(heidi.StateError):
        core.tick()
    with pytest.raises(heidi.JournalError):
        verify_run(cfg)


def test_start_cut_short_after_pipeline_start_is_finished(tmp_path):
    """Killed between pipeline_start and round_start: the next holder finishes the start."""
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    with open(cfg.journal_path, "rb") as fh:
        first = fh.readline()
    with open(cfg.journal_path, "wb") as fh:
        fh.write(first)
    os.unlink(cfg.state_path)
    view = orjson.loads(core.tick())
    assert (view["round"], view["state"]) == (1, "VALIDATING")
    kinds = types(cfg)
    assert kinds[:4] == ["pipeline_start", "state_recovered", "round_start", "stage_start"]
    check_run(cfg)
    from heidi.core import run
    assert run(cfg)["status"] == "completed"
    check_run(cfg)


def test_start_cut_short_then_heidi_run(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    with open(cfg.journal_path, "rb") as fh:
        first = fh.readline()
    with open(cfg.journal_path, "wb") as fh:
        fh.write(first)
    os.unlink(cfg.state_path)
    from heidi.core import run
    view = run(cfg)
    assert (view["status"], view["round"]) == ("completed", 1)
    kinds = [k for k in types(cfg) if k != "state_recovered"]
    assert kinds == expected_full(1)
    check_run(cfg)


@pytest.mark.parametrize("crash_after", [0, 1, 2, 3])
def test_archive_cut_short_is_recoverable(tmp_path, monkeypatch, crash_after):
    """Killed while archiving a finished run (after some of its files moved): start still works."""
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config

    def runner(ctx, stage, round_):  # a stage that writes (and records) logs/ and data/
        outcome = mock_stage(ctx, stage, round_)
        if stage == "generate":
            for sub in ("logs", "data"):
                os.makedirs(os.path.join(cfg.out_dir, sub))
                with open(os.path.join(cfg.out_dir, sub, "x.txt"), "w") as fh:
                    fh.write(sub)
            outcome.artifact_paths = ["logs", "data"]
        return outcome

    with Machine(cfg, stage_runner=runner) as machine:
        machine.start()
        while machine.tick():
            pass
    old_id = status(core)["run_id"]
    dest = os.path.join(cfg.out_dir, "runs", old_id)
    real_rename = os.rename
    moves = []

    def rename(src, dst, *a, **kw):
        if os.path.dirname(os.fspath(dst)) == dest:
            if len(moves) == crash_after:
                raise _Crash
            moves.append(os.path.basename(src))
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(_Crash):
        core.start()
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(moves) == crash_after
    core.start()  # rebuilds the old run's state from its journal if needed, archives it, starts
    assert status(core)["run_id"] != old_id
    assert sorted(os.listdir(dest)) == ["data", "events.jsonl", "logs", "state.json"]
    verify_run(cfg, os.path.join(dest, "events.jsonl"))
    assert orjson.loads(core.tick(max_steps=10))["status"] == "completed"
    check_run(cfg)


@pytest.mark.parametrize("mock", [True, False], ids=["mock", "saved-running"])
def test_stage_running_left_by_a_dead_holder_is_rerun(tmp_path, mock):
    """The holder died mid-stage: the next tick records stage_interrupted and runs the stage again."""
    cfg = make_config(tmp_path, ROUNDS=1, HEIDI_MOCK_SUBPROCESSES=mock)

    def dies_in_validate(machine, stage, r):
        if stage == "validate":
            raise KeyboardInterrupt  # the process is going down mid-stage
        return mock_stage(machine, stage, r)

    with Machine(cfg, stage_runner=dies_in_validate) as m:
        m.start()
        m.tick()
        with pytest.raises(KeyboardInterrupt):
            m.tick()
    state = read_state(cfg.state_path)
    if not mock:  # a real stage saves "running" before it starts
        assert (state["state"], state["stage_status"]) == ("VALIDATING", "running")
    assert types(cfg)[-1] == "stage_start"

    ran = []

    def ok(machine, stage, r):
        ran.append(stage)
        return mock_stage(machine, stage, r)

    with Machine(cfg, stage_runner=ok) as m:
        assert m.tick()
        assert ran == ["validate"]
        assert m.state["state"] == "FINALIZING"
        while m.tick():
            pass
    evs = events(cfg)
    kinds = [e["event_type"] for e in evs]
    i = kinds.index("stage_interrupted")
    assert (evs[i]["stage"], evs[i]["level"]) == ("validate", "warn")
    assert kinds[i - 1] == "stage_start"  # caught up, nothing journaled for it
    assert kinds[i + 1:i + 4] == list(STAGE_EVENTS)
    attempt = max(j for j in range(i) if kinds[j] == "stage_start")  # the interrupted attempt
    assert evs[attempt]["stage"] == "validate"
    cleaned = [k for j, k in enumerate(kinds)
               if j != attempt and k not in ("state_recovered", "stage_interrupted")]
    assert cleaned == expected_full(1)
    check_run(cfg)


def test_holder_dying_after_script_success_does_not_redo_the_stage(tmp_path, monkeypatch):
    """script_success is journaled: the next holder writes the missing stage_end, never re-runs
    (a train stage may have taken hours)."""
    cfg = make_config(tmp_path, ROUNDS=1)
    real_emit = Machine._emit

    def dies_before_stage_end(self, event_type, message="", **kw):
        if event_type == "stage_end" and kw.get("stage") == "train":
            raise KeyboardInterrupt  # killed between script_success and stage_end
        return real_emit(self, event_type, message, **kw)

    with Machine(cfg) as m:
        m.start()
        while m.state["state"] != "FINALIZING":
            m.tick()
        monkeypatch.setattr(Machine, "_emit", dies_before_stage_end)
        with pytest.raises(KeyboardInterrupt):
            m.tick()
    monkeypatch.setattr(Machine, "_emit", real_emit)
    assert types(cfg)[-1] == "script_success"
    ran = []

    def counting(machine, stage, r):
        ran.append(stage)
        return mock_stage(machine, stage, r)

    with Machine(cfg, stage_runner=counting) as m:
        assert m.tick()
        assert ran == []  # train was not run again
        assert m.state["state"] == "EVALUATING"
        while m.tick():
            pass
    assert ran == ["eval"]
    kinds = [k for k in types(cfg) if k != "state_recovered"]
    assert kinds == expected_full(1)
    assert kinds.count("script_success") == 4  # generate, validate, train, eval: once each
    check_run(cfg)


def test_holder_killed_mid_stage_in_another_process(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=1)
    script = textwrap.dedent(f"""
        import os
        from heidi.config import Config
        from heidi.machine import Machine, mock_stage
        cfg = Config.load(None, environ={{}}, overrides={{"OUT_DIR": {cfg.out_dir!r}, "ROUNDS": 1,
                          "HEIDI_MOCK_SUBPROCESSES": False, "HEIDI_FSYNC": False}})
        def runner(machine, stage, r):
            if stage == "train":
                os._exit(9)
            return mock_stage(machine, stage, r)
        with Machine(cfg, stage_runner=runner) as m:
            m.start()
            while m.tick():
                pass
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    state = read_state(cfg.state_path)
    assert (state["state"], state["stage_status"], state["current_stage"]) == (
        "FINALIZING", "running", "train")
    core = heidi.Core()
    core.config = cfg
    view = orjson.loads(core.tick())
    assert view["state"] == "EVALUATING"
    kinds = types(cfg)
    assert kinds[-5:] == ["stage_start", "stage_interrupted"] + list(STAGE_EVENTS)
    assert orjson.loads(core.tick())["status"] == "completed"
    check_run(cfg)


def test_torn_last_line_is_repaired(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    with open(cfg.journal_path, "ab") as fh:
        fh.write(b'{"event_version":"1.0","ts":"2026-')  # a write cut off by a crash
    view = orjson.loads(core.tick())
    assert view["state"] == "VALIDATING"
    kinds = types(cfg)
    assert "journal_repaired" in kinds
    assert os.path.exists(cfg.journal_path + ".torn-1")
    core.tick(max_steps=10)
    check_run(cfg)


@pytest.mark.parametrize("damage", [b"{garbage", b"[1, 2]", b'{"run_id": "x"}', b""])
def test_damaged_state_json_is_kept_aside_and_rebuilt(tmp_path, damage):
    cfg = make_config(tmp_path, ROUNDS=1)
    with Machine(cfg) as m:
        m.start()
        m.tick()
    before = read_state(cfg.state_path)
    with open(cfg.state_path, "wb") as fh:
        fh.write(damage)
    with Machine(cfg) as m:
        assert m.state["state"] == before["state"] and m.state["run_id"] == before["run_id"]
        while m.tick():
            pass
    with open(cfg.state_path + ".corrupt-1", "rb") as fh:
        assert fh.read() == damage  # the damaged file is kept, not lost
    assert "state_recovered" in types(cfg)
    assert read_state(cfg.state_path)["status"] == "completed"
    check_run(cfg)


def test_damaged_state_json_without_a_journal_is_an_error(tmp_path):
    cfg = make_config(tmp_path)
    os.makedirs(cfg.out_dir)
    with open(cfg.state_path, "wb") as fh:
        fh.write(b"{garbage")
    with pytest.raises(heidi.StateError, match="not valid JSON"):
        Machine(cfg).open()
    with open(cfg.state_path, "rb") as fh:
        assert fh.read() == b"{garbage"


# -- every state heidi writes is one it accepts when it reads it back ---------------------------

@pytest.mark.parametrize("mode", ["full", "collect"])
def test_every_state_written_passes_the_shape_check(tmp_path, monkeypatch, mode):
    """read_state refuses a state.json of the wrong shape (a tick rebuilds it from the journal): one
    that heidi itself wrote must never be refused, or every tick would rebuild it. Through errors,
    continue, pause, resume, stop and train-now, every state written is checked."""
    import json

    from heidi import status as status_mod
    from heidi.loop import StageOutcome, state_problem
    from heidi.machine import Machine, mock_stage

    written: list[dict] = []
    real_write = status_mod.StatusWriter.write

    def write(self, state):
        written.append(json.loads(json.dumps(state)))
        return real_write(self, state)

    monkeypatch.setattr(status_mod.StatusWriter, "write", write)
    failed: list[str] = []

    def runner(ctx, stage, round_):
        if stage == "validate" and not failed:
            failed.append(stage)
            return StageOutcome(ok=False, error="exited with code 7", output_tail="API outage")
        return mock_stage(ctx, stage, round_)

    cfg = make_core(tmp_path, ROUNDS=2, HEIDI_MODE=mode).config
    with Machine(cfg, stage_runner=runner) as machine:
        machine.start()
        while machine.tick():
            pass
        assert machine.state["status"] == "error"
        machine.act("continue")
        machine.tick()
        machine.act("pause")
        machine.tick()
        machine.act("resume")
        machine.tick()
        if mode == "collect":
            while machine.tick():
                pass
            assert machine.state["state"] == "IDLE" and machine.state["status"] == "idle"
            machine.act("train_now")
            machine.tick()
        machine.act("stop")
        machine.act("continue")
        while machine.tick():
            pass
    statuses = {s["status"] for s in written}
    seen = {"error", "paused", "stopped", "running"} | ({"completed"} if mode == "full" else {"idle"})
    assert seen <= statuses, statuses
    assert [(s["status"], state_problem(s)) for s in written if state_problem(s)] == []
    assert read_state(cfg.state_path) == written[-1]
