"""The loop through the Python API (heidi.Core) and heidi.machine.Machine: whole runs in both
modes, every row of the transition table, failing stages. Every scenario ends with check_run: the
journal verifies and state.json is exactly the journal replayed (design.md §4, §3).
"""
from __future__ import annotations

import os

import orjson
import pytest

import heidi
from heidi.errors import RefusedError
from heidi.journal import read_events
from heidi.loop import NEXT_ROUND, STAGE_OF, TRANSITIONS, StageOutcome
from heidi.machine import Machine, mock_stage

from helpers_loop import (FULL_STAGES, STAGE_EVENTS, TESTED_STAGES, check_run, events,
                          expected_collect, expected_full, fail_on, make_config, make_core,
                          stage_block, status, types)

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


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
    # amounts add up over stages, percentages stay per stage (the last one of each)
    ok = [e for e in evs if e["event_type"] == "script_success"]
    assert state["usage"]["wall_ms"] == pytest.approx(sum(e["usage_delta"]["wall_ms"] for e in ok))
    assert "cpu_pct" not in state["usage"]
    last_eval = [e for e in ok if e["stage"] == "eval"][-1]
    assert state["usage_by_stage"]["eval"] == last_eval["usage_delta"]

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
    rounds = [e["round"] for e in events(core.config) if e["event_type"] == "round_start"]
    assert rounds == list(range(1, 101))
    state = check_run(core.config)
    assert state["journal"]["events"] == len(kinds) == 2 + 100 * 13


# -- every row of the transition table ------------------------------------------------------

def _drive_to(machine: Machine, target: str, round_: int) -> None:
    """Tick successful stages (train-now in collect IDLE) until the machine is in target/round."""
    for _ in range(200):
        state = machine.state
        if (state["state"], state["current_round"], state["stage_status"]) == (target, round_, "pending"):
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
    assert (err["level"], err["stage"], err["round"], err["error"]) == (
        "error", stage, 1, "exited with code 3")
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


@pytest.mark.parametrize("stage, keep", [("generate", 400), ("eval", 300)])
def test_a_secret_where_a_failing_stage_tail_is_cut_leaves_no_part(tmp_path, stage, keep):
    """The tail of a failed stage's output is redacted before it is cut to the message's
    length (a Slurm stage's reason reaches the machine unredacted): a secret the cut went
    through leaves none of its characters."""
    cfg = make_config(tmp_path, ROUNDS=1)
    secret = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
    tail = "early output " + secret + "y" * (keep - 12)  # the cut falls inside the secret
    with Machine(cfg, stage_runner=fail_on(stage, tail=tail)) as m:
        m.start()
        while m.tick():
            pass
    written = open(cfg.journal_path, encoding="utf-8").read()
    assert "[GITHUB_TOKEN]" in written
    for n in range(8, len(secret) + 1):
        for start in range(0, len(secret) - n + 1, 4):
            assert secret[start:start + n] not in written, secret[start:start + n]
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


def test_fsync_on_full_run(tmp_path):
    core = make_core(tmp_path, ROUNDS=2, HEIDI_FSYNC=1)
    assert core.config.fsync
    core.start()
    view = orjson.loads(core.tick(max_steps=20))
    assert view["status"] == "completed"
    assert types(core.config) == expected_full(2)
    check_run(core.config)
