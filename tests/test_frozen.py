"""The one-file frozen binary dies with its bootloader: SIGKILL of the process cron or systemd
started (PyInstaller's bootloader) while a stage runs leaves, within 2 s, no heidi process and no
stage process, and the next tick continues the same run -- and removes the directory the killed
bootloader had unpacked heidi into (it could not), while a running heidi's is never touched.

Runs only against a built binary: HEIDI_FROZEN_BINARY=dist/heidi (`.ci/run` does so after the
frozen build)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import orjson
import pytest

BINARY = os.environ.get("HEIDI_FROZEN_BINARY", "")
pytestmark = pytest.mark.skipif(not BINARY, reason="no frozen binary given: set "
                                "HEIDI_FROZEN_BINARY=dist/heidi (built by packaging/build.sh)")
_SCRUB = ("RUN_ID", "OUT_DIR", "HEIDI_MODE", "ROUNDS", "RUN_UNIT_TESTS", "HEIDI_CONFIG",
          "HEIDI_MOCK_SUBPROCESSES", "HEIDI_FSYNC", "HEIDI_CLOCK", "HEIDI_REPO_ROOT",
          "HEIDI_PYTHON", "HEIDI_KILL_GRACE_S", "MAX_CPU_PCT", "MAX_MEM_PCT")


def _processes(binary: str, marker: str) -> list[int]:
    """Live (not zombie) processes running the binary, or carrying the marker in argv."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                argv = fh.read()
            exe = os.path.realpath(f"/proc/{name}/exe")
        except OSError:
            continue
        if exe == binary or marker.encode() in argv:
            found.append(int(name))
    return found


def test_sigkill_of_the_bootloader_ends_heidi_and_the_next_tick_continues(tmp_path):
    binary = os.path.realpath(BINARY)
    assert os.access(binary, os.X_OK), f"{binary}: not an executable"
    marker = f"heidi-frozen-test-{os.getpid()}-{time.monotonic_ns()}"
    (tmp_path / "heidi.toml").write_text(
        f'[stages.generate]\ncommand = ["/bin/sh", "-c", "sleep 60; echo {marker}", "{marker}"]\n')
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    unpack_to = tmp_path / "tmp"
    unpack_to.mkdir()
    env.update(OUT_DIR=str(tmp_path / "out"), HEIDI_CONFIG=str(tmp_path / "heidi.toml"),
               TMPDIR=str(unpack_to),
               ROUNDS="1", MAX_CPU_PCT="100", MAX_MEM_PCT="100", HEIDI_FSYNC="0",
               HEIDI_KILL_GRACE_S="1")
    done = subprocess.run([binary, "start"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    boot = subprocess.Popen([binary, "tick"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    state_path = tmp_path / "out" / "state.json"
    try:
        deadline = time.monotonic() + 60
        while True:
            state = orjson.loads(state_path.read_bytes())
            if state["stage_status"] == "running" and len(_processes(binary, marker)) >= 3:
                break  # bootloader, heidi (+ its watchdog), and the stage
            assert time.monotonic() < deadline and boot.poll() is None, "the stage never started"
            time.sleep(0.05)
        before = _processes(binary, marker)
        unpacked = os.listdir(unpack_to)
        # another heidi's start-up sweep leaves a running heidi's directory alone
        done = subprocess.run([binary, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert os.listdir(unpack_to) == unpacked and len(unpacked) == 1
        assert _processes(binary, marker) == before
        boot.kill()  # SIGKILL: the bootloader cannot forward anything
        boot.wait(5)
        gone_by = time.monotonic() + 2.0
        while _processes(binary, marker) and time.monotonic() < gone_by:
            time.sleep(0.05)
        left = _processes(binary, marker)
    finally:
        for pid in _processes(binary, marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert len(before) >= 3
    assert left == [], f"still running 2 s after the bootloader's SIGKILL: {left}"
    assert os.listdir(unpack_to) == unpacked  # left behind: nothing could delete it
    events = [orjson.loads(line) for line in (tmp_path / "out" / "events.jsonl").read_bytes().splitlines()]
    assert events[-1]["event_type"] == "pipeline_interrupted"
    assert "SIGTERM" in events[-1]["message"] and events[-1]["stage"] == "generate"
    # the next tick takes the run up again: the stage runs again (here: a quick one)
    (tmp_path / "heidi.toml").write_text('[stages.generate]\ncommand = ["/bin/true"]\n')
    done = subprocess.run([binary, "tick"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = [orjson.loads(line)["event_type"]
             for line in (tmp_path / "out" / "events.jsonl").read_bytes().splitlines()]
    assert kinds.count("pipeline_start") == 1 and kinds[-4:] == [
        "stage_interrupted", "stage_start", "script_success", "stage_end"]
    done = subprocess.run([binary, "verify", "--out-dir", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.listdir(unpack_to) == []  # swept by the tick; each one's own went with its bootloader
