"""`continue` takes a failed or stopped run up again in its run_id; a signal leaves a run
interrupted (never stopped) for the next holder; control requests apply in arrival order."""
from __future__ import annotations

import os
import signal

import pytest

from heidi import control
from heidi.core import control_action, status as core_status
from heidi.errors import RefusedError
from heidi.interrupt import Interrupted
from heidi.lock import RunLock
from heidi.loop import StageOutcome
from heidi.machine import Machine, mock_stage

from cli_helpers import heidi_cli
from helpers_loop import check_run, expected_full, make_config, types

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


def fails_once(stage_name: str):
    seen = []

    def runner(ctx, stage, round_):
        if stage == stage_name and not seen:
            seen.append(round_)
            return StageOutcome(ok=False, error="exited with code 7", output_tail="API outage")
        return mock_stage(ctx, stage, round_)
    return runner


def drive(machine: Machine) -> None:
    while machine.tick():
        pass


@pytest.mark.parametrize("stage", ["generate", "validate", "train"])
def test_continue_after_an_error_runs_the_failed_stage_again(tmp_path, stage):
    cfg = make_config(tmp_path, ROUNDS=2)
    with Machine(cfg, stage_runner=fails_once(stage)) as machine:
        machine.start()
        drive(machine)
        assert machine.state["status"] == "error"
        run_id = machine.state["run_id"]
        machine.act("continue")
        assert (machine.state["status"], machine.state["current_stage"]) == ("running", stage)
        drive(machine)
        assert machine.state["status"] == "completed" and machine.state["run_id"] == run_id
    kinds = types(cfg)
    i = kinds.index("pipeline_error")
    assert kinds[i:i + 3] == ["pipeline_error", "pipeline_continue", "stage_start"]
    failed = kinds[:i]
    assert failed[-1] == "stage_start"
    # once the error and the continue are taken out, exactly the run a flawless loop journals
    assert failed[:-1] + kinds[i + 2:] == expected_full(2)
    check_run(cfg)  # the chain goes on unbroken, and replay gives the same state


def test_continue_after_a_stop_mid_stage_and_while_waiting(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=1, HEIDI_MODE="collect")

    seen: list[int] = []

    def stopped_once(ctx, stage, round_):
        if stage == "validate" and not seen:
            seen.append(1)
            control.request(ctx.config.control_dir, "stop")
            assert ctx.stop_requested()
            return StageOutcome(ok=False, stopped=True, error="stopped")
        return mock_stage(ctx, stage, round_)

    with Machine(cfg, stage_runner=stopped_once) as machine:
        machine.start()
        drive(machine)
        assert machine.state["status"] == "stopped"
        machine.act("continue")
        assert (machine.state["state"], machine.state["stage_status"]) == ("VALIDATING", "pending")
        drive(machine)
        assert (machine.state["state"], machine.state["status"]) == ("IDLE", "idle")  # collect
        machine.act("stop")
        machine.act("continue")
        assert (machine.state["state"], machine.state["status"]) == ("IDLE", "idle")
        machine.act("train_now")
        drive(machine)
        assert machine.state["status"] == "completed"
    kinds = types(cfg)
    assert kinds.count("pipeline_start") == 1 and kinds.count("pipeline_continue") == 2
    check_run(cfg)


@pytest.mark.parametrize("status", ["running", "paused", "completed"])
def test_continue_refused_unless_error_or_stopped(tmp_path, status):
    cfg = make_config(tmp_path, ROUNDS=1)
    with Machine(cfg) as machine:
        machine.start()
        if status == "paused":
            machine.act("pause")
        if status == "completed":
            drive(machine)
        count = len(types(cfg))
        with pytest.raises(RefusedError, match=f"is {status}; only a run in ERROR or stopped"):
            machine.act("continue")
    assert len(types(cfg)) == count


def test_continue_queued_for_the_holder(tmp_path):
    """Another process holds a failed run (a daemon): the request waits for it, then applies."""
    cfg = make_config(tmp_path, ROUNDS=1)
    with Machine(cfg, stage_runner=fails_once("generate")) as machine:
        machine.start()
        drive(machine)
    with RunLock(cfg.lock_path):
        how, view = control_action(cfg, "continue")
        assert how == "queued" and view["pending_requests"] == ["continue"]
    with Machine(cfg) as machine:
        drive(machine)
        assert machine.state["status"] == "completed"
    check_run(cfg)


def test_a_stop_applies_after_the_requests_queued_before_it(tmp_path):
    """pause, then stop, while a stage runs: the pause is journaled first, then the stop (and
    nothing is refused); a resume queued after the stop is judged after it (refused)."""
    cfg = make_config(tmp_path, ROUNDS=1)

    def runner(ctx, stage, round_):
        if stage == "validate":
            for action in ("pause", "stop", "resume"):
                control.request(ctx.config.control_dir, action)
            assert ctx.stop_requested()
            return StageOutcome(ok=False, stopped=True, error="stopped")
        return mock_stage(ctx, stage, round_)

    with Machine(cfg, stage_runner=runner) as machine:
        machine.start()
        drive(machine)
        machine.apply_requests()
        assert machine.state["status"] == "stopped"
    kinds = types(cfg)
    assert kinds[-4:] == ["stage_start", "pipeline_pause", "pipeline_stop", "request_refused"]
    assert control.pending(cfg.control_dir) == []
    check_run(cfg)


def test_a_signal_leaves_the_run_interrupted_for_the_next_holder(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=1, HEIDI_MOCK_SUBPROCESSES=False)
    machine = Machine(cfg, stage_runner=None)

    def runner(ctx, stage, round_):
        if stage == "train":
            machine.interrupt.set(signal.SIGTERM)  # as the signal handler does
            assert ctx.stop_requested()
            return StageOutcome(ok=False, stopped=True, error="stopped",
                                usage_delta={"wall_ms": 5.0})
        return mock_stage(ctx, stage, round_)

    machine.stage_runner = runner
    with machine.open():
        machine.start()
        with pytest.raises(Interrupted) as info:
            drive(machine)
        assert info.value.exit_code == 128 + signal.SIGTERM
        assert machine.state["status"] == "running" and machine.state["stage_status"] == "running"
    events = types(cfg)
    assert events[-2:] == ["stage_start", "pipeline_interrupted"] and "pipeline_stop" not in events
    view = core_status(cfg)
    assert view["status"] == "interrupted" and view["interrupted"] is True
    with Machine(cfg, stage_runner=mock_stage) as again:
        assert again.status()["status"] == "running"  # its holder: not interrupted
        drive(again)
        assert again.state["status"] == "completed"
    kinds = types(cfg)
    i = kinds.index("pipeline_interrupted")
    assert kinds[i:i + 3] == ["pipeline_interrupted", "stage_interrupted", "stage_start"]
    assert [k for k in kinds if k not in ("pipeline_interrupted", "stage_interrupted")] == (
        expected_full(1)[:9] + expected_full(1)[8:])  # train's stage_start twice
    check_run(cfg)


def test_cli_continue_and_the_error_line_names_the_way_out(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "heidi.toml").write_text(
        '[stages.validate]\ncommand = ["/bin/sh", "-c", "test -e {out_dir}/fixed || exit 3; '
        'printf \'1\\\\n2\\\\n\' > {data_dir}/clean_round_{round}.jsonl"]\n')
    env = dict(OUT_DIR=out, ROUNDS="1", HEIDI_CONFIG=str(tmp_path / "heidi.toml"),
               MAX_CPU_PCT="100", MAX_MEM_PCT="100", HEIDI_FSYNC="0",
               HEIDI_STAGE_TIMEOUT_S="30")
    # generate/train/eval: a command that writes nothing and succeeds
    for stage in ("generate", "train", "eval"):
        with open(tmp_path / "heidi.toml", "a") as fh:
            fh.write(f'[stages.{stage}]\ncommand = ["/bin/true"]\n')
    run = heidi_cli("run", **env)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "`heidi continue`" in run.stderr
    assert "`heidi start`" in run.stderr
    tick = heidi_cli("tick", **env)
    assert tick.returncode == 1 and tick.stderr == run.stderr
    again = heidi_cli("run", **env)
    assert again.returncode == 1 and again.stderr == run.stderr
    open(os.path.join(out, "fixed"), "w").close()
    cont = heidi_cli("continue", **env)
    assert cont.returncode == 0 and cont.stdout.startswith("continuing: run "), cont.stdout
    done = heidi_cli("run", "--json", **env)
    assert done.returncode == 0, done.stderr
    refused = heidi_cli("continue", **env)
    assert refused.returncode == 1 and "is completed; only a run in ERROR or stopped" in refused.stderr
    kinds = types(make_config(tmp_path, OUT_DIR=out))
    assert kinds.count("pipeline_start") == 1 and kinds[-1] == "pipeline_complete"
    assert heidi_cli("verify", "--out-dir", out).returncode == 0


def test_a_signal_to_heidi_run_waiting_while_paused_ends_it(tmp_path):
    """A paused foreground `heidi run` waits for resume; a signal ends the wait (exit 128+N) and
    journals nothing: the run stays paused."""
    import subprocess
    import sys
    import time

    from cli_helpers import clean_env, empty_cwd
    out = str(tmp_path / "out")
    env = clean_env(OUT_DIR=out, ROUNDS="1", HEIDI_MOCK_SUBPROCESSES="1", HEIDI_FSYNC="0")
    assert subprocess.run([sys.executable, "-m", "heidi", "start"], env=env, cwd=empty_cwd(),
                          capture_output=True, timeout=60).returncode == 0
    assert subprocess.run([sys.executable, "-m", "heidi", "pause"], env=env, cwd=empty_cwd(),
                          capture_output=True, timeout=60).returncode == 0
    cfg = make_config(tmp_path, OUT_DIR=out)
    count = len(types(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "heidi", "run"], env=env, cwd=empty_cwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        from heidi.lock import lock_holder
        deadline = time.monotonic() + 30
        while lock_holder(cfg.lock_path) != proc.pid:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "SIGTERM" in proc.stderr.read()
    assert len(types(cfg)) == count
    assert core_status(cfg)["status"] == "paused"
