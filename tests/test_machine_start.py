"""Starting a run: refused while one is active, with a bad mode or a run id already used; the
finished run before it is archived to OUT_DIR/runs/<run_id>/."""
from __future__ import annotations

import os

import orjson
import pytest

from heidi import control
from heidi.errors import RefusedError
from heidi.journal import read_events, verify_run
from heidi.status import read_state

from helpers_loop import check_run, events, make_core, status, types

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


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
