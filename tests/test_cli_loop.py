"""The loop through the `heidi` command line, one process per command, as cron would drive it.

What is checked is what a user sees: exit codes, output (none from a successful tick), the JSON of
`status --json`, the journal on disk and `heidi verify` (design.md §4, §9).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import orjson
import pytest

from heidi.config import Config
from heidi.journal import read_events
from heidi.lock import RunLock
from heidi.machine import Machine, StageOutcome, mock_stage
from heidi.status import read_state

from helpers_loop import ENV_SETTINGS, REPO, expected_full

STATUS_KEYS = {"state", "round", "mode", "run_id", "status", "stage", "paused"}


class Heidi:
    """Runs `python -m heidi ...` against one OUT_DIR, in mock mode."""

    def __init__(self, tmp_path, **env: str) -> None:
        self.out_dir = str(tmp_path / "out")
        self.cwd = str(tmp_path)
        base = {k: v for k, v in os.environ.items() if k not in ENV_SETTINGS}
        base.update(PYTHONPATH=REPO, HEIDI_MOCK_SUBPROCESSES="1", HEIDI_FSYNC="0", ROUNDS="2")
        base.update(env)
        self.env = base

    def __call__(self, *args: str, out_dir: bool = True, **env: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "heidi", *args]
        if out_dir:
            argv += ["--out-dir", self.out_dir]
        return subprocess.run(argv, env={**self.env, **env}, cwd=self.cwd, capture_output=True,
                              text=True, timeout=60)

    def status(self) -> dict:
        proc = self("status", "--json")
        assert proc.stderr == ""
        view = orjson.loads(proc.stdout)
        assert proc.returncode == (1 if view["state"] == "ERROR" else 0)
        return view

    def tick_silently(self) -> None:
        proc = self("tick")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    @property
    def journal(self) -> str:
        return os.path.join(self.out_dir, "events.jsonl")

    def kinds(self) -> list[str]:
        return [e["event_type"] for e in read_events(self.journal)]

    def verify(self) -> None:
        proc = self("verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("OK: ") and proc.stderr == ""
        proc = self("verify", "--json")
        report = orjson.loads(proc.stdout)
        assert proc.returncode == 0 and report["ok"] is True
        assert report["events"] == len(self.kinds())


def one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text.strip()


@pytest.fixture
def heidi(tmp_path):
    return Heidi(tmp_path)


# -- the loop, tick by tick ------------------------------------------------------------------

def test_full_mode_start_then_ticks(heidi):
    proc = heidi("start")
    assert proc.returncode == 0 and proc.stderr == ""
    assert one_line(proc.stdout).startswith("started run run_")
    view = heidi.status()
    assert set(view) >= STATUS_KEYS
    assert {k: view[k] for k in STATUS_KEYS - {"run_id"}} == {
        "state": "COLLECTING", "round": 1, "mode": "full", "status": "running", "stage": "generate",
        "paused": False}
    run_id = view["run_id"]
    path = []
    for _ in range(20):
        heidi.tick_silently()
        view = heidi.status()
        path.append((view["round"], view["state"]))
        if view["status"] == "completed":
            break
    assert path == [(1, "VALIDATING"), (1, "FINALIZING"), (1, "EVALUATING"), (2, "COLLECTING"),
                    (2, "VALIDATING"), (2, "FINALIZING"), (2, "EVALUATING"), (2, "IDLE")]
    assert (view["run_id"], view["status"], view["paused"], view["stage"]) == (
        run_id, "completed", False, None)
    assert heidi.kinds() == expected_full(2)
    heidi.verify()
    heidi.tick_silently()  # a completed run: tick does nothing, silently
    assert heidi.kinds() == expected_full(2)
    proc = heidi("status")
    assert proc.returncode == 0 and "completed" in one_line(proc.stdout)


def test_tick_steps(heidi):
    heidi("start")
    proc = heidi("tick", "--steps", "100")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert heidi.status()["status"] == "completed"
    assert heidi.kinds() == expected_full(2)


def test_collect_mode_and_train_now(heidi):
    proc = heidi("start", "--mode", "collect", "--json")
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["mode"] == "collect"
    for round_ in (1, 2):
        heidi.tick_silently()
        heidi.tick_silently()
        view = heidi.status()
        assert (view["state"], view["status"], view["round"], view["mode"]) == (
            "IDLE", "idle", round_, "collect")
        before = heidi.kinds()
        heidi.tick_silently()  # waiting for train-now: nothing happens
        assert heidi.kinds() == before
        proc = heidi("train-now")
        assert proc.returncode == 0 and proc.stderr == ""
        assert one_line(proc.stdout).startswith("train-now applied")
        assert heidi.status()["state"] == "FINALIZING"
        heidi.tick_silently()
        heidi.tick_silently()
    assert heidi.status()["status"] == "completed"
    kinds = heidi.kinds()
    assert kinds.count("train_now") == 2 and kinds[-1] == "pipeline_complete"
    heidi.verify()


def test_collect_mode_from_heidi_mode_env(tmp_path):
    heidi = Heidi(tmp_path, HEIDI_MODE="collect", ROUNDS="1")
    assert heidi("start").returncode == 0
    assert heidi("tick", "--steps", "10").returncode == 0
    view = heidi.status()
    assert (view["mode"], view["state"], view["status"]) == ("collect", "IDLE", "idle")
    proc = heidi("train-now", "--json")
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["result"] == "applied"
    assert heidi("tick", "--steps", "10").returncode == 0
    assert heidi.status()["status"] == "completed"
    heidi.verify()


def test_run_unit_tests_inserts_testing(tmp_path):
    heidi = Heidi(tmp_path, RUN_UNIT_TESTS="1", ROUNDS="1")
    heidi("start")
    states = []
    for _ in range(10):
        heidi.tick_silently()
        view = heidi.status()
        states.append(view["state"])
        if view["status"] == "completed":
            break
    assert states == ["VALIDATING", "TESTING", "FINALIZING", "EVALUATING", "IDLE"]
    assert heidi.kinds() == expected_full(1, ("generate", "validate", "test", "train", "eval"))
    heidi.verify()


def test_heidi_run_to_completion(heidi):
    proc = heidi("run")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")  # not a TTY: quiet
    assert heidi.kinds() == expected_full(2)
    view = heidi.status()
    assert (view["status"], view["round"]) == ("completed", 2)
    heidi.verify()
    # run again: the finished run is archived and a new one runs
    proc = heidi("run", "--json")
    assert proc.returncode == 0
    new = orjson.loads(proc.stdout)
    assert new["status"] == "completed" and new["run_id"] != view["run_id"]
    assert os.path.isfile(os.path.join(heidi.out_dir, "runs", view["run_id"], "events.jsonl"))
    heidi.verify()


def test_heidi_run_collect_stops_in_idle(heidi):
    proc = heidi("run", "--mode", "collect")
    assert proc.returncode == 0
    view = heidi.status()
    assert (view["state"], view["status"]) == ("IDLE", "idle")
    heidi("train-now")
    assert heidi("run").returncode == 0  # continues the run: train, eval, next round's collection
    view = heidi.status()
    assert (view["state"], view["status"], view["round"]) == ("IDLE", "idle", 2)


# -- exit codes ------------------------------------------------------------------------------

def test_no_run(heidi):
    proc = heidi("tick")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no run" in one_line(proc.stderr)
    for action in ("stop", "pause", "resume", "train-now"):
        proc = heidi(action)
        assert proc.returncode == 1 and proc.stdout == "", action
        one_line(proc.stderr)
    proc = heidi("status")
    assert proc.returncode == 0 and one_line(proc.stdout).startswith("no run")
    proc = heidi("status", "--json")
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["status"] == "none"


def test_tick_and_actions_do_not_create_a_missing_out_dir(heidi, tmp_path):
    missing = tmp_path / "nowhere"
    for cmd in ("tick", "stop", "pause", "resume", "train-now"):
        proc = heidi(cmd, "--out-dir", str(missing), out_dir=False)
        assert proc.returncode == 1 and "no run" in one_line(proc.stderr), cmd
        assert not missing.exists(), cmd


def test_lock_held_by_another_process(heidi):
    heidi("start")
    lock_path = os.path.join(heidi.out_dir, "heidi.lock")
    with RunLock(lock_path):
        for args in (("tick",), ("tick", "--steps", "5")):
            proc = heidi(*args)
            assert (proc.returncode, proc.stdout, proc.stderr) == (75, "", "")
        proc = heidi("run")
        assert proc.returncode == 75 and proc.stdout == ""
        one_line(proc.stderr)
        proc = heidi("start")
        assert proc.returncode == 75 and proc.stdout == ""
        one_line(proc.stderr)
        # status reads without the lock, and tells who holds it
        view = heidi.status()
        assert view["holder_pid"] == os.getpid() and view["state"] == "COLLECTING"
        for action in ("pause", "stop"):
            proc = heidi(action)
            assert proc.returncode == 0 and proc.stderr == ""
            assert "requested" in one_line(proc.stdout)
            assert f"pid {os.getpid()}" in proc.stdout
        proc = heidi("resume", "--json")
        assert proc.returncode == 0 and orjson.loads(proc.stdout)["result"] == "queued"
        assert heidi.status()["pending_requests"] == ["pause", "stop", "resume"]
        proc = heidi("train-now")  # full mode: refused at once, even queued
        assert proc.returncode == 1 and proc.stdout == ""
        assert "train-now" in one_line(proc.stderr)
    heidi.tick_silently()  # the next holder applies the queue, in order
    kinds = heidi.kinds()
    # resume after stop no longer applies: refused, and said so in the journal
    assert kinds[-3:] == ["pipeline_pause", "pipeline_stop", "request_refused"]
    view = heidi.status()
    assert (view["state"], view["status"], view["pending_requests"]) == ("IDLE", "stopped", [])
    assert os.listdir(os.path.join(heidi.out_dir, "control")) == []
    heidi.verify()


def test_pause_resume_stop_applied_directly(heidi):
    heidi("start")
    proc = heidi("pause")
    assert proc.returncode == 0 and one_line(proc.stdout).startswith("paused:")
    before = heidi.kinds()
    heidi.tick_silently()
    assert heidi.kinds() == before
    view = heidi.status()
    assert (view["status"], view["paused"]) == ("paused", True)
    proc = heidi("resume")
    assert proc.returncode == 0 and one_line(proc.stdout).startswith("resumed:")
    heidi.tick_silently()
    assert heidi.status()["state"] == "VALIDATING"
    proc = heidi("stop")
    assert proc.returncode == 0 and one_line(proc.stdout).startswith("stopped:")
    view = heidi.status()
    assert (view["state"], view["status"]) == ("IDLE", "stopped")
    heidi.tick_silently()
    for action in ("stop", "pause", "train-now"):
        proc = heidi(action)
        assert proc.returncode == 1 and proc.stdout == ""
        one_line(proc.stderr)
    heidi.verify()


def test_train_now_refused(heidi):
    heidi("start")
    proc = heidi("train-now")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "collect mode" in one_line(proc.stderr)
    assert heidi.kinds() == ["pipeline_start", "round_start"]


def test_start_refused_while_active(heidi):
    heidi("start")
    proc = heidi("start", "--mode", "collect")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "already" in one_line(proc.stderr)


@pytest.mark.parametrize("argv", [
    ["tick", "--steps", "0"],
    ["tick", "--steps", "x"],
    ["frobnicate"],
    ["tick", "--bogus"],
    ["start", "--mode", "turbo"],
    ["status", "extra-arg"],
])
def test_bad_usage_exits_2_with_one_line(heidi, argv):
    proc = heidi(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    one_line(proc.stderr)
    assert not os.path.exists(heidi.out_dir)  # nothing written


@pytest.mark.parametrize("env", [{"ROUNDS": "abc"}, {"ROUNDS": "0"}, {"HEIDI_MODE": "fast"},
                                 {"RUN_ID": "../escape"}, {"HEIDI_FSYNC": "maybe"}])
def test_bad_config_exits_2_with_one_line(heidi, env):
    for command in ("start", "tick", "run"):
        proc = heidi(command, **env)
        assert proc.returncode == 2 and proc.stdout == "", (command, proc.stderr)
        line = one_line(proc.stderr)
        assert list(env)[0] in line
    assert not os.path.exists(heidi.out_dir)


# -- a run in ERROR --------------------------------------------------------------------------

def _errored_run(heidi, stage: str = "train") -> Config:
    """ERROR built through the Python API (a failing stage runner), in the CLI's OUT_DIR."""
    cfg = Config.load(None, environ={}, overrides={"OUT_DIR": heidi.out_dir, "ROUNDS": 2,
                                                   "HEIDI_MOCK_SUBPROCESSES": True})

    def runner(machine, name, r):
        if name == stage:
            return StageOutcome(ok=False, error="exited with code 3",
                                output_tail="CUDA error: out of memory\n")
        return mock_stage(machine, name, r)

    with Machine(cfg, stage_runner=runner) as m:
        m.start()
        while m.tick():
            pass
        assert m.state["state"] == "ERROR"
    return cfg


def _check_error_exits(heidi, stage: str) -> None:
    before = heidi.kinds()
    proc = heidi("tick")
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert f"failed in {stage}" in line
    assert heidi.kinds() == before  # nothing more happens
    proc = heidi("status")
    assert proc.returncode == 1 and "ERROR" in one_line(proc.stdout)
    view = heidi.status()  # asserts exit 1 for ERROR
    assert (view["state"], view["status"], view["stage"]) == ("ERROR", "error", stage)
    assert view["last_error"]
    proc = heidi("run")
    assert proc.returncode == 1 and proc.stdout == ""
    one_line(proc.stderr)
    assert heidi.kinds() == before
    heidi.verify()  # the journal of a failed run is fine


def test_run_in_error_exits_1(heidi):
    _errored_run(heidi, "train")
    _check_error_exits(heidi, "train")
    assert heidi.kinds()[-1] == "pipeline_error"


def test_real_stage_with_missing_script_errors(tmp_path):
    """Not mock mode: the stage script does not exist, so generate fails and the run is in ERROR."""
    probe = subprocess.run([sys.executable, "-c", "import heidi.stages"],
                           env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
    if probe.returncode != 0 or importlib.util.find_spec("heidi.stages") is None:
        pytest.skip("heidi.stages is not importable yet")
    repo_root = tmp_path / "empty_repo"
    repo_root.mkdir()
    heidi = Heidi(tmp_path, HEIDI_MOCK_SUBPROCESSES="0", HEIDI_REPO_ROOT=str(repo_root),
                  HEIDI_KILL_GRACE_S="1", MAX_CPU_PCT="100", MAX_MEM_PCT="100")  # a busy box: no hold
    assert heidi("start").returncode == 0
    proc = heidi("tick")
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert "failed in generate" in one_line(proc.stderr)
    events = list(read_events(heidi.journal))
    assert events[-1]["event_type"] == "pipeline_error" and events[-1]["level"] == "error"
    assert events[-1]["error"]
    _check_error_exits(heidi, "generate")


def test_verify_detects_tampering(heidi):
    heidi("start")
    heidi("tick", "--steps", "3")
    with open(heidi.journal, "rb") as fh:
        lines = fh.readlines()
    lines[2] = lines[2].replace(b'"level":"info"', b'"level":"warn"')
    with open(heidi.journal, "wb") as fh:
        fh.writelines(lines)
    proc = heidi("verify")
    assert proc.returncode == 1
    assert one_line(proc.stdout).startswith("line 4:")
    assert read_state(os.path.join(heidi.out_dir, "state.json"))["journal"]["events"] == len(lines)


def _run_on_a_terminal(argv, env, cwd):
    """Run argv with stdout on a pseudo-terminal; returns (exit code, everything it printed)."""
    import pty
    import select as _select

    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    chunks = []
    while True:
        ready, _, _ = _select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def test_run_shows_live_progress_on_a_terminal_only(heidi):
    code, out = _run_on_a_terminal([sys.executable, "-m", "heidi", "run", "--out-dir", heidi.out_dir],
                                   heidi.env, heidi.cwd)
    assert code == 0
    assert "\r[round 1/2] COLLECTING (generate)" in out  # the live line, rewritten in place
    assert "[round 2/2] EVALUATING (eval)" in out
    assert out.rstrip().splitlines()[-1].startswith("run run_")  # then one summary line
    assert "completed" in out.rstrip().splitlines()[-1]
    # not a terminal: quiet
    heidi("start")  # a new run (the last one completed)
    proc = heidi("run")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
