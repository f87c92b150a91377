"""Every file heidi writes is 0600 and every directory it makes 0700, whatever the umask (run here
under umask 0, where anything else would show); what a stage writes itself keeps the stage's own
umask (README: Files of a run)."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from cli_helpers import clean_env
from heidi.lock import RunLock


def _mode(path) -> str:
    return oct(stat.S_IMODE(os.lstat(path).st_mode))


def _heidi(cwd, *args, **env):
    return subprocess.run([sys.executable, "-m", "heidi", *args], capture_output=True, text=True,
                          env=clean_env(**env), cwd=str(cwd), timeout=120,
                          preexec_fn=lambda: os.umask(0))


@pytest.fixture
def example(tmp_path):
    """The example pipeline run once (one round, test gate on) under umask 0."""
    demo = tmp_path / "demo"
    assert _heidi(tmp_path, "init", str(demo)).returncode == 0
    proc = _heidi(demo, "run", ROUNDS="1", RUN_UNIT_TESTS="1", MAX_CPU_PCT="100", MAX_MEM_PCT="100")
    assert proc.returncode == 0, proc.stderr
    return demo, demo / "out"


def test_files_heidi_writes_are_0600_and_its_directories_0700(example):
    demo, out = example
    heidi_files = ["events.jsonl", "state.json", "heidi.lock", "data/raw_round_1.jsonl",
                   "data/train_round_1.jsonl", "data/val_round_1.jsonl",
                   "logs/round_1/generate.counters.json"]
    heidi_files += [f"logs/round_1/{s}.log" for s in ("generate", "validate", "test", "train", "eval")]
    for rel in heidi_files:
        assert _mode(out / rel) == "0o600", rel
    for rel in ("", "data", "eval", "logs", "logs/round_1"):
        assert _mode(out / rel) == "0o700", rel or "OUT_DIR"
    # the stages' own outputs: their umask (0 here), not heidi's business
    assert _mode(out / "data" / "clean_round_1.jsonl") == "0o666"
    assert _mode(out / "eval" / "report_round_1.json") == "0o666"
    # a finished run archived by the next start: runs/ and runs/<id>/ are heidi's directories
    assert _heidi(demo, "start").returncode == 0
    runs = out / "runs"
    assert _mode(runs) == "0o700"
    (archived,) = list(runs.iterdir())
    assert _mode(archived) == "0o700" and _mode(archived / "events.jsonl") == "0o600"


def test_control_requests_are_0600(tmp_path):
    out = tmp_path / "out"
    assert _heidi(tmp_path, "start", "--out-dir", str(out), HEIDI_MOCK_SUBPROCESSES="1").returncode == 0
    lock = RunLock(str(out / "heidi.lock")).acquire()  # another process holds the run
    try:
        proc = _heidi(tmp_path, "pause", "--out-dir", str(out))
        assert proc.returncode == 0 and "requested" in proc.stdout
    finally:
        lock.release()
    assert _mode(out / "control") == "0o700"
    (request,) = list((out / "control").iterdir())
    assert _mode(request) == "0o600"


def test_the_daemon_files_are_0600(tmp_path):
    out = tmp_path / "out"
    proc = _heidi(tmp_path, "daemon", "--detach", "--port", "0", "--out-dir", str(out),
                  HEIDI_MOCK_SUBPROCESSES="1", HEIDI_MODE="collect")
    assert proc.returncode == 0, proc.stderr
    pid = int((out / "heidi.pid").read_text().split()[0])
    try:
        for name in ("heidi.pid", "daemon.log", "daemon.json", "events.jsonl", "state.json"):
            assert _mode(out / name) == "0o600", name
    finally:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while time.monotonic() < end and os.path.exists(out / "heidi.pid"):
            time.sleep(0.1)
        if os.path.exists(out / "heidi.pid"):
            os.kill(pid, signal.SIGKILL)
