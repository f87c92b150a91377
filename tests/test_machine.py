"""The loop's state machine through the Python API (heidi.Core) and heidi.machine.Machine.

Every scenario ends with the same checks a user would run: the journal verifies (`heidi verify`),
and state.json is exactly what replaying the journal gives (design.md §4, §3).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import orjson
import pytest

import heidi
from heidi import control
from heidi.config import Config
from heidi.errors import RefusedError, RunLocked
from heidi.journal import read_events, verify_journal
from heidi.lock import RunLock
from heidi.machine import (NEXT_ROUND, STAGE_OF, TRANSITIONS, Machine, StageOutcome, mock_stage,
                           verify_run)
from heidi.status import read_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_STAGES = ("generate", "validate", "train", "eval")
TESTED_STAGES = ("generate", "validate", "test", "train", "eval")
STAGE_EVENTS = ("stage_start", "script_success", "stage_end")
# Settings a developer's shell might export; the tests pin their own.
_ENV_SETTINGS = ("RUN_ID", "OUT_DIR", "HEIDI_MODE", "ROUNDS", "RUN_UNIT_TESTS", "HEIDI_CONFIG",
                 "HEIDI_MOCK_SUBPROCESSES", "HEIDI_FSYNC", "HEIDI_CLOCK", "HEIDI_REPO_ROOT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in _ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./heidi.toml


# -- helpers ---------------------------------------------------------------------------------

def make_config(tmp_path, **overrides) -> Config:
    values = {"OUT_DIR": str(tmp_path / "out"), "ROUNDS": 2, "HEIDI_MOCK_SUBPROCESSES": True,
              "HEIDI_FSYNC": False}
    values.update(overrides)
    return Config.load(None, environ={}, overrides=values)


def make_core(tmp_path, **overrides) -> heidi.Core:
    values = {"OUT_DIR": str(tmp_path / "out"), "ROUNDS": 2, "HEIDI_MOCK_SUBPROCESSES": 1,
              "HEIDI_FSYNC": 0}
    values.update(overrides)
    core = heidi.Core()
    core.init(None, **values)
    return core


def events(cfg: Config, path: str | None = None) -> list[dict]:
    return list(read_events(path or cfg.journal_path))


def types(cfg: Config) -> list[str]:
    return [e["event_type"] for e in events(cfg)]


def stage_block(stages) -> list[str]:
    return [kind for _ in stages for kind in STAGE_EVENTS]


def expected_full(rounds: int, stages=FULL_STAGES) -> list[str]:
    seq = ["pipeline_start"]
    for _ in range(rounds):
        seq.append("round_start")
        seq += stage_block(stages)
    seq.append("pipeline_complete")
    return seq


def expected_collect(rounds: int, tests: bool = False) -> list[str]:
    seq = ["pipeline_start"]
    before = ("generate", "validate", "test") if tests else ("generate", "validate")
    for _ in range(rounds):
        seq.append("round_start")
        seq += stage_block(before)
        seq.append("train_now")
        seq += stage_block(("train", "eval"))
    seq.append("pipeline_complete")
    return seq


def check_run(cfg: Config) -> dict:
    """`heidi verify` passes, and state.json is exactly the journal replayed."""
    count, head, run_id = verify_run(cfg)
    assert verify_journal(cfg.journal_path) == (count, head, run_id)
    state = read_state(cfg.state_path)
    assert state is not None
    assert state["journal"]["events"] == count and state["journal"]["head"] == head
    assert state["journal"]["bytes"] == os.path.getsize(cfg.journal_path)
    assert state["run_id"] == run_id
    replayed = Machine(cfg, stage_runner=mock_stage)._replay()
    on_disk = {k: v for k, v in state.items() if k not in ("round", "pending_requests")}
    assert on_disk == replayed
    assert state["round"] == state["current_round"]
    assert oct(os.stat(cfg.state_path).st_mode & 0o777) == oct(0o600)
    assert oct(os.stat(cfg.journal_path).st_mode & 0o777) == oct(0o600)
    return state


def status(core: heidi.Core) -> dict:
    return core.get_status()


def ticks_until_done(core: heidi.Core, limit: int = 10_000) -> int:
    """Tick one transition at a time until nothing moves; returns the number of ticks that moved."""
    cfg = core.config
    moved = 0
    for _ in range(limit):
        before = read_state(cfg.state_path)["journal"]["events"]
        view = orjson.loads(core.tick())
        after = read_state(cfg.state_path)["journal"]["events"]
        if after == before:
            return moved
        moved += 1
        assert view["state"] != "ERROR"
    raise AssertionError("the run never settled")


def fail_on(stage_name: str, error: str = "exited with code 3",
            tail: str = "Traceback (most recent call last):\nValueError: bad sample\n"):
    def runner(machine: Machine, stage: str, round_: int) -> StageOutcome:
        if stage == stage_name:
            return StageOutcome(ok=False, error=error, output_tail=tail,
                                usage_delta={"memory_mb_delta": 2.0, "cpu_pct": 50.0,
                                             "system_mem_available_kb_delta": -10,
                                             "system_cpu_pct": 20.0})
        return mock_stage(machine, stage, round_)
    return runner


# -- the basic loop --------------------------------------------------------------------------

def test_full_mode_two_rounds_exact_sequence(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    started = orjson.loads(core.start("full"))
    assert started["state"] == "COLLECTING" and started["round"] == 1
    assert started["status"] == "running" and started["stage"] == "generate"
    cfg = core.config
    assert types(cfg) == ["pipeline_start", "round_start"]

    seen_states = []
    for _ in range(8):  # 4 stages x 2 rounds: one transition per tick
        view = orjson.loads(core.tick())
        seen_states.append((view["round"], view["state"]))
    assert seen_states == [(1, "VALIDATING"), (1, "FINALIZING"), (1, "EVALUATING"), (2, "COLLECTING"),
                           (2, "VALIDATING"), (2, "FINALIZING"), (2, "EVALUATING"), (2, "IDLE")]
    view = status(core)
    assert {k: view[k] for k in ("state", "round", "mode", "status", "stage", "paused")} == {
        "state": "IDLE", "round": 2, "mode": "full", "status": "completed", "stage": None,
        "paused": False}
    assert isinstance(view["run_id"], str) and view["run_id"].startswith("run_")
    assert orjson.loads(core.get_status_json())["run_id"] == view["run_id"]

    evs = events(cfg)
    assert [e["event_type"] for e in evs] == expected_full(2)
    # each event names its round and stage; the first links to the run id
    assert evs[0]["prev_hash"] == view["run_id"]
    assert evs[0]["message"].startswith("Starting training pipeline (mode=full, rounds=2")
    body = [e for e in evs if e["event_type"] in STAGE_EVENTS]
    assert [(e["round"], e["stage"]) for e in body[::3]] == [
        (r, s) for r in (1, 2) for s in FULL_STAGES]
    for e in body:
        assert e["level"] == {"stage_start": "info", "script_success": "success",
                              "stage_end": "info"}[e["event_type"]]
        if e["event_type"] == "script_success":
            assert set(e["usage_delta"]) >= {"memory_mb_delta", "cpu_pct",
                                             "system_mem_available_kb_delta", "system_cpu_pct"}
    assert [e["round"] for e in evs if e["event_type"] == "round_start"] == [1, 2]
    assert evs[-1]["level"] == "success" and evs[-1]["round"] == 2
    state = check_run(cfg)
    # usage: every stage's delta counted once (script_success carries it, stage_end nothing)
    assert all(e["usage_delta"] == {} for e in evs if e["event_type"] == "stage_end")
    total = sum(e["usage_delta"]["cpu_pct"] for e in evs if e["event_type"] == "script_success")
    assert state["usage"]["cpu_pct"] == pytest.approx(total)

    # a completed run: ticks do nothing
    assert orjson.loads(core.tick(max_steps=5))["status"] == "completed"
    assert types(cfg) == expected_full(2)
    core.shutdown()


def test_tick_max_steps_counts_transitions(tmp_path):
    core = make_core(tmp_path, ROUNDS=3)
    core.start()
    view = orjson.loads(core.tick(max_steps=3))
    assert (view["round"], view["state"]) == (1, "EVALUATING")
    view = orjson.loads(core.tick(max_steps=100))
    assert (view["round"], view["state"], view["status"]) == (3, "IDLE", "completed")
    assert types(core.config) == expected_full(3)
    check_run(core.config)


def test_collect_mode_waits_for_train_now(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    core.start("collect")
    cfg = core.config
    for _round in (1, 2):
        view = orjson.loads(core.tick())
        assert view["state"] == "VALIDATING"
        view = orjson.loads(core.tick())
        assert (view["state"], view["status"], view["mode"]) == ("IDLE", "idle", "collect")
        count = len(types(cfg))
        for _ in range(3):  # waiting: ticks do nothing
            assert orjson.loads(core.tick())["status"] == "idle"
        assert len(types(cfg)) == count
        assert core.action_train_now() == "applied"
        view = status(core)
        assert (view["state"], view["status"], view["stage"]) == ("FINALIZING", "running", "train")
        assert orjson.loads(core.tick())["state"] == "EVALUATING"
        view = orjson.loads(core.tick())
    assert (view["state"], view["status"], view["round"]) == ("IDLE", "completed", 2)
    assert types(cfg) == expected_collect(2)
    check_run(cfg)


def test_collect_mode_from_the_heidi_mode_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HEIDI_MODE", "collect")
    core = heidi.Core()
    core.init(None, OUT_DIR=str(tmp_path / "out"), ROUNDS=1, HEIDI_MOCK_SUBPROCESSES=1, HEIDI_FSYNC=0)
    view = orjson.loads(core.start())  # no mode given: HEIDI_MODE decides
    assert view["mode"] == "collect"
    view = orjson.loads(core.tick(max_steps=10))
    assert (view["state"], view["status"]) == ("IDLE", "idle")


@pytest.mark.parametrize("mode", ["full", "collect"])
def test_run_unit_tests_inserts_testing(tmp_path, mode):
    core = make_core(tmp_path, ROUNDS=2, RUN_UNIT_TESTS=1)
    core.start(mode)
    cfg = core.config
    states = []
    for _ in range(40):
        view = orjson.loads(core.tick())
        states.append(view["state"])
        if view["status"] == "completed":
            break
        if view["state"] == "IDLE":
            assert mode == "collect" and view["status"] == "idle"
            core.action_train_now()
    assert "TESTING" in states
    if mode == "full":
        assert types(cfg) == expected_full(2, TESTED_STAGES)
    else:
        assert types(cfg) == expected_collect(2, tests=True)
    assert events(cfg)[0]["message"].endswith("run_unit_tests=1)")
    check_run(cfg)


def test_hundred_rounds_mock(tmp_path):
    core = make_core(tmp_path, ROUNDS=100)
    core.start()
    view = orjson.loads(core.tick(max_steps=100 * 4 + 10))
    assert (view["state"], view["status"], view["round"]) == ("IDLE", "completed", 100)
    kinds = types(core.config)
    assert kinds.count("pipeline_complete") == 1 and kinds[-1] == "pipeline_complete"
    assert kinds == expected_full(100)
    assert [e["round"] for e in events(core.config) if e["event_type"] == "round_start"] == list(range(1, 101))
    state = check_run(core.config)
    assert state["journal"]["events"] == len(kinds) == 2 + 100 * 13


# -- every row of the transition table ------------------------------------------------------

def _drive_to(machine: Machine, target: str, round_: int) -> None:
    """Tick successful stages (train-now in collect IDLE) until the machine is in target/round."""
    for _ in range(200):
        state = machine.state
        if state["state"] == target and state["current_round"] == round_ and state["stage_status"] == "pending":
            return
        if state["state"] == "IDLE" and state["status"] == "idle":
            machine.act("train_now")
            continue
        assert machine.tick(), f"stuck in {state['state']} before reaching {target}"
    raise AssertionError(f"never reached {target} in round {round_}")


ROWS = [(state, outcome, mode, round_)
        for (state, outcome) in TRANSITIONS
        for mode in ("full", "collect")
        for round_ in ((1, 2) if TRANSITIONS[(state, outcome)][0] == NEXT_ROUND else (1,))]


@pytest.mark.parametrize("state,outcome,mode,round_", ROWS,
                         ids=[f"{s}-{o}-{m}-r{r}" for s, o, m, r in ROWS])
def test_transition_table_row(tmp_path, state, outcome, mode, round_):
    tests = outcome == "ok+tests" or state == "TESTING"
    stage = STAGE_OF[state]
    calls = []

    def runner(machine, stage_name, r):
        calls.append((stage_name, r))
        if stage_name == stage and r == round_ and outcome == "failed":
            return StageOutcome(ok=False, error="exited with code 3", output_tail="boom")
        return mock_stage(machine, stage_name, r)

    cfg = make_config(tmp_path, ROUNDS=2, RUN_UNIT_TESTS=tests, HEIDI_MODE=mode)
    with Machine(cfg, stage_runner=runner) as m:
        m.start(mode)
        _drive_to(m, state, round_)
        before = len(calls)
        assert m.tick()
        assert calls[before:] == [(stage, round_)]  # exactly one stage ran
        got = (m.state["state"], m.state["status"], m.state["current_round"])
        full, collect = TRANSITIONS[(state, outcome)]
        want = full if mode == "full" else collect
        if want == NEXT_ROUND:
            want = ("COLLECTING", "running", round_ + 1) if round_ < 2 else ("IDLE", "completed", 2)
        elif want == "ERROR":
            want = ("ERROR", "error", round_)
        elif want == "IDLE":
            want = ("IDLE", "idle", round_)
        else:
            want = (want, "running", round_)
        assert got == want
        assert m.tick() is (want[0] not in ("IDLE", "ERROR"))
    last = [e for e in events(cfg) if e["event_type"] in ("stage_end", "pipeline_error")]
    last = [e for e in last if e["stage"] == stage and e["round"] == round_][-1]
    if outcome == "failed":
        assert last["level"] == ("warn" if state == "EVALUATING" else "error")
        assert last["error"] == "exited with code 3"
    check_run(cfg)


# -- failures --------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["generate", "validate", "test", "train"])
def test_failing_stage_is_fail_closed(tmp_path, stage):
    cfg = make_config(tmp_path, ROUNDS=3, RUN_UNIT_TESTS=True)
    secret = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    tail = f"loading data\nusing token {secret}\nValueError: bad sample in row 7\n"
    with Machine(cfg, stage_runner=fail_on(stage, tail=tail)) as m:
        m.start("full")
        for _ in range(10):
            if not m.tick():
                break
        assert (m.state["state"], m.state["status"]) == ("ERROR", "error")
        assert m.state["last_error"] == "exited with code 3"
        count = m.journal.count
        assert m.tick() is False and m.tick() is False
        assert m.journal.count == count
    evs = events(cfg)
    err = evs[-1]
    assert err["event_type"] == "pipeline_error"
    assert (err["level"], err["stage"], err["round"], err["error"]) == ("error", stage, 1, "exited with code 3")
    assert "ValueError: bad sample in row 7" in err["message"]
    assert secret not in open(cfg.journal_path, encoding="utf-8").read()  # redacted before writing
    assert secret not in open(cfg.state_path, encoding="utf-8").read()
    assert [e["event_type"] for e in evs].count("pipeline_error") == 1
    check_run(cfg)

    # nothing moves any more, through the API either
    core = heidi.Core()
    core.config = cfg
    view = orjson.loads(core.tick(max_steps=5))
    assert (view["state"], view["status"], view["last_error"]) == ("ERROR", "error", "exited with code 3")
    assert len(events(cfg)) == len(evs)
    for action in (core.pause, core.action_train_now):
        with pytest.raises(RefusedError):
            action()
    check_run(cfg)
    # `heidi start` is how a user begins again: the failed run is archived, not lost
    old_id = view["run_id"]
    core.start("full")
    assert status(core)["run_id"] != old_id
    archived = os.path.join(cfg.out_dir, "runs", old_id, "events.jsonl")
    assert [e["event_type"] for e in read_events(archived)][-1] == "pipeline_error"
    check_run(cfg)


def test_failing_stage_error_defaults_when_runner_gives_none(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=1)

    def runner(machine, stage, r):
        return StageOutcome(ok=False)

    with Machine(cfg, stage_runner=runner) as m:
        m.start()
        m.tick()
    err = events(cfg)[-1]
    assert (err["event_type"], err["error"]) == ("pipeline_error", "generate failed")
    check_run(cfg)


def test_failing_eval_warns_and_goes_on(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=2)
    with Machine(cfg, stage_runner=fail_on("eval", error="exited with code 1")) as m:
        m.start()
        while m.tick():
            pass
        assert (m.state["state"], m.state["status"], m.state["current_round"]) == ("IDLE", "completed", 2)
    evs = events(cfg)
    ends = [e for e in evs if e["event_type"] == "stage_end" and e["stage"] == "eval"]
    assert [(e["round"], e["level"], e["error"]) for e in ends] == [(1, "warn", "exited with code 1"),
                                                                     (2, "warn", "exited with code 1")]
    kinds = [e["event_type"] for e in evs]
    assert "pipeline_error" not in kinds and kinds.count("pipeline_complete") == 1
    # the eval's block is stage_start, stage_end(warn): no script_success
    expected = ["pipeline_start"]
    for _ in range(2):
        expected += ["round_start"] + stage_block(("generate", "validate", "train"))
        expected += ["stage_start", "stage_end"]
    assert kinds == expected + ["pipeline_complete"]
    check_run(cfg)


# -- control actions -------------------------------------------------------------------------

def test_pause_resume(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    core.start()
    core.tick()
    cfg = core.config
    assert core.pause() == "applied"
    view = status(core)
    assert (view["status"], view["paused"], view["state"]) == ("paused", True, "VALIDATING")
    count = len(types(cfg))
    for _ in range(3):
        view = orjson.loads(core.tick(max_steps=3))
        assert (view["status"], view["paused"], view["state"]) == ("paused", True, "VALIDATING")
    assert len(types(cfg)) == count
    assert core.pause() == "applied"  # pausing a paused run changes nothing
    assert len(types(cfg)) == count
    with pytest.raises(RefusedError):
        core.start()
    assert core.resume() == "applied"
    view = status(core)
    assert (view["status"], view["paused"]) == ("running", False)
    view = orjson.loads(core.tick(max_steps=10))
    assert view["status"] == "completed"
    kinds = types(cfg)
    assert kinds == (["pipeline_start", "round_start"] + stage_block(("generate",))
                     + ["pipeline_pause", "pipeline_resume"]
                     + stage_block(("validate", "train", "eval")) + ["pipeline_complete"])
    check_run(cfg)
    with pytest.raises(RefusedError):
        core.resume()  # completed: nothing to resume


def test_pause_in_collect_idle_then_train_now(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    core.start("collect")
    core.tick(max_steps=5)
    assert status(core)["status"] == "idle"
    core.pause()
    assert status(core)["status"] == "paused"
    core.resume()
    assert status(core)["status"] == "idle"
    core.action_train_now()
    assert orjson.loads(core.tick(max_steps=5))["status"] == "completed"
    check_run(core.config)


def test_stop(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    core.start()
    core.tick(max_steps=2)
    assert core.stop() == "applied"
    view = status(core)
    assert (view["state"], view["status"], view["paused"]) == ("IDLE", "stopped", False)
    kinds = types(core.config)
    assert kinds[-1] == "pipeline_stop" and kinds.count("pipeline_stop") == 1
    assert events(core.config)[-1]["level"] == "warn"
    count = len(kinds)
    view = orjson.loads(core.tick(max_steps=3))
    assert view["status"] == "stopped"
    assert len(types(core.config)) == count
    for action in (core.stop, core.pause, core.action_train_now):
        with pytest.raises(RefusedError):
            action()
    check_run(core.config)


def test_stop_while_paused(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    core.start()
    core.pause()
    core.stop()
    view = status(core)
    assert (view["status"], view["paused"], view["state"]) == ("stopped", False, "IDLE")
    check_run(core.config)


def test_stage_runner_reporting_stopped(tmp_path):
    """A stop that ends a running stage: pipeline_stop during the stage, the stop request consumed."""
    cfg = make_config(tmp_path, ROUNDS=2)

    def runner(machine, stage, r):
        if stage == "train":
            control.request(machine.config.control_dir, "stop")  # as `heidi stop` from elsewhere
            assert machine.stop_requested()
            return StageOutcome(ok=False, stopped=True, error="stopped")
        return mock_stage(machine, stage, r)

    with Machine(cfg, stage_runner=runner) as m:
        m.start()
        while m.tick():
            pass
        assert (m.state["state"], m.state["status"]) == ("IDLE", "stopped")
    assert control.pending(cfg.control_dir) == []
    kinds = types(cfg)
    assert kinds[-2:] == ["stage_start", "pipeline_stop"]
    check_run(cfg)


@pytest.mark.parametrize("setup", ["full-running", "collect-collecting", "completed", "stopped"])
def test_train_now_refused_outside_collect_idle(tmp_path, setup):
    core = make_core(tmp_path, ROUNDS=1)
    mode = "collect" if setup.startswith("collect") else "full"
    core.start(mode)
    if setup == "completed":
        core.tick(max_steps=10)
    if setup == "stopped":
        core.stop()
    count = len(types(core.config))
    with pytest.raises(RefusedError) as info:
        core.action_train_now()
    assert "\n" not in str(info.value)
    assert len(types(core.config)) == count
    check_run(core.config)


def test_actions_without_a_run_are_refused(tmp_path):
    core = make_core(tmp_path)
    for action in (core.pause, core.resume, core.stop, core.action_train_now, core.tick):
        with pytest.raises(RefusedError):
            action()
    assert status(core)["status"] == "none"


# -- starting --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["running", "paused", "collect-idle"])
def test_start_refused_while_a_run_is_active(tmp_path, how):
    core = make_core(tmp_path, ROUNDS=2)
    core.start("collect" if how == "collect-idle" else "full")
    if how == "paused":
        core.pause()
    if how == "collect-idle":
        core.tick(max_steps=5)
    run_id = status(core)["run_id"]
    count = len(types(core.config))
    for mode in ("full", "collect"):
        with pytest.raises(RefusedError):
            core.start(mode)
    assert status(core)["run_id"] == run_id
    assert len(types(core.config)) == count
    assert not os.path.exists(os.path.join(core.config.out_dir, "runs"))
    check_run(core.config)


def test_start_bad_mode_refused(tmp_path):
    core = make_core(tmp_path)
    with pytest.raises(RefusedError):
        core.start("turbo")
    assert status(core)["status"] == "none"


@pytest.mark.parametrize("end", ["completed", "stopped"])
def test_start_after_the_end_archives_the_old_run(tmp_path, end):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    if end == "completed":
        core.tick(max_steps=10)
    else:
        core.tick()
        core.stop()
    old = status(core)
    old_events = types(cfg)
    control.request(cfg.control_dir, "pause")  # aimed at the old run: dropped with it

    core.start("collect")
    new = status(core)
    assert new["run_id"] != old["run_id"]
    assert (new["state"], new["status"], new["mode"], new["round"]) == ("COLLECTING", "running", "collect", 1)
    assert new["pending_requests"] == []
    archive = os.path.join(cfg.out_dir, "runs", old["run_id"])
    assert sorted(os.listdir(archive)) == ["events.jsonl", "state.json"]
    assert [e["event_type"] for e in read_events(os.path.join(archive, "events.jsonl"))] == old_events
    count, _head, run_id = verify_run(cfg, os.path.join(archive, "events.jsonl"))
    assert (count, run_id) == (len(old_events), old["run_id"])
    assert read_state(os.path.join(archive, "state.json"))["status"] == end
    # the new journal is a new chain, linked to the new run id
    evs = events(cfg)
    assert [e["event_type"] for e in evs] == ["pipeline_start", "round_start"]
    assert evs[0]["prev_hash"] == new["run_id"]
    check_run(cfg)
    assert orjson.loads(core.tick(max_steps=10))["status"] == "idle"
    check_run(cfg)


def test_start_with_run_id_already_archived_is_refused(tmp_path):
    """RUN_ID naming the finished run (or an archived one): refused, and nothing is moved."""
    core = make_core(tmp_path, ROUNDS=1, RUN_ID="exp-1")
    cfg = core.config
    core.start()
    core.tick(max_steps=10)
    with pytest.raises(RefusedError):
        core.start()
    view = status(core)
    assert (view["run_id"], view["status"]) == ("exp-1", "completed")
    assert not os.path.exists(os.path.join(cfg.out_dir, "runs", "exp-1"))
    check_run(cfg)
    cfg.run_id = "exp-2"
    core.start()
    assert status(core)["run_id"] == "exp-2"
    core.tick(max_steps=10)
    cfg.run_id = "exp-1"  # archived now
    with pytest.raises(RefusedError):
        core.start()
    assert status(core)["run_id"] == "exp-2"
    assert not os.path.exists(os.path.join(cfg.out_dir, "runs", "exp-2"))
    check_run(cfg)


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
    assert status(core)["status"] == "none"  # readers see no state until a holder rebuilds it
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


def test_state_json_older_than_the_journal_is_rebuilt(tmp_path):
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
    # rebuilt: it knows validate ran, so this tick runs train (no duplicated stage)
    assert view["state"] == "EVALUATING"
    kinds = types(cfg)
    assert kinds.count("state_recovered") == 1
    core.tick(max_steps=20)
    kinds = types(cfg)
    kinds.remove("state_recovered")
    assert kinds == expected_full(2)
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
    core.start()
    core.tick(max_steps=10)
    for sub in ("logs", "data"):
        os.makedirs(os.path.join(cfg.out_dir, sub))
        with open(os.path.join(cfg.out_dir, sub, "x.txt"), "w") as fh:
            fh.write(sub)
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
    assert kinds[i - 1] == ("state_recovered" if mock else "stage_start")
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
    assert (state["state"], state["stage_status"], state["current_stage"]) == ("FINALIZING", "running", "train")
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


# -- control requests queued while another process holds the run ----------------------------

def test_requests_queued_while_held_are_applied_in_order(tmp_path):
    core = make_core(tmp_path, ROUNDS=2)
    cfg = core.config
    core.start()
    core.tick()
    lock = RunLock(cfg.lock_path).acquire()
    try:
        with pytest.raises(RunLocked):
            core.tick()
        assert core.pause() == "queued"
        assert core.resume() == "queued"  # a pause is pending: resume is accepted
        assert core.stop() == "queued"
        view = status(core)
        assert view["pending_requests"] == ["pause", "resume", "stop"]
        assert view["holder_pid"] == os.getpid()
        assert view["stop_requested"] and view["pause_requested"]
        assert len(os.listdir(cfg.control_dir)) == 3
        with pytest.raises(RefusedError):
            core.action_train_now()  # refused at once: full mode
    finally:
        lock.release()
    count = len(types(cfg))
    view = orjson.loads(core.tick())
    assert (view["state"], view["status"]) == ("IDLE", "stopped")
    assert types(cfg)[count:] == ["pipeline_pause", "pipeline_resume", "pipeline_stop"]
    assert os.listdir(cfg.control_dir) == []
    assert status(core)["pending_requests"] == []
    check_run(cfg)


def test_queued_pause_then_tick_does_nothing(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    with RunLock(cfg.lock_path):
        assert core.pause() == "queued"
    count = len(types(cfg))
    view = orjson.loads(core.tick())
    assert (view["status"], view["state"]) == ("paused", "COLLECTING")
    assert types(cfg)[count:] == ["pipeline_pause"]
    with RunLock(cfg.lock_path):
        assert core.resume() == "queued"
    view = orjson.loads(core.tick())
    assert view["state"] == "VALIDATING"
    assert types(cfg)[count + 1:] == ["pipeline_resume"] + stage_block(("generate",))
    check_run(cfg)


def test_queued_train_now_in_collect_idle(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start("collect")
    core.tick(max_steps=5)
    with RunLock(cfg.lock_path):
        assert core.action_train_now() == "queued"
    count = len(types(cfg))
    view = orjson.loads(core.tick())
    assert view["state"] == "EVALUATING"
    assert types(cfg)[count:] == ["train_now"] + stage_block(("train",))
    assert os.listdir(cfg.control_dir) == []
    check_run(cfg)


def test_queued_request_that_no_longer_applies_is_refused_in_the_journal(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    with RunLock(cfg.lock_path):
        control.request(cfg.control_dir, "train_now")  # bypassing the CLI's precheck
    count = len(types(cfg))
    view = orjson.loads(core.tick())
    assert view["state"] == "VALIDATING"
    evs = events(cfg)[count:]
    assert evs[0]["event_type"] == "request_refused" and evs[0]["level"] == "warn"
    assert [e["event_type"] for e in evs[1:]] == list(STAGE_EVENTS)
    assert os.listdir(cfg.control_dir) == []
    check_run(cfg)


def test_queued_requests_refused_at_once_when_the_run_is_over(tmp_path):
    core = make_core(tmp_path, ROUNDS=1)
    cfg = core.config
    core.start()
    core.tick(max_steps=10)
    with RunLock(cfg.lock_path):
        for action in (core.pause, core.stop, core.action_train_now, core.resume):
            with pytest.raises(RefusedError):
                action()
    assert control.pending(cfg.control_dir) == []


def test_fsync_on_full_run(tmp_path):
    core = make_core(tmp_path, ROUNDS=2, HEIDI_FSYNC=1)
    assert core.config.fsync
    core.start()
    view = orjson.loads(core.tick(max_steps=20))
    assert view["status"] == "completed"
    assert types(core.config) == expected_full(2)
    check_run(core.config)


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
