"""Control actions on a run: stop, pause, resume and train-now applied by the holder of the run,
and queued by other processes while it is held (judged at once, applied in order)."""
from __future__ import annotations

import os

import orjson
import pytest

from heidi import control
from heidi.errors import RefusedError, RunLocked
from heidi.lock import RunLock
from heidi.loop import StageOutcome
from heidi.machine import Machine, mock_stage

from helpers_loop import (STAGE_EVENTS, check_run, events, make_config, make_core, stage_block,
                          status, types)

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


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
