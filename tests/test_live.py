"""Seeing a long run: usage folded by what each number means, a running stage visibly alive in
`heidi status` (text, --json, --watch) and `heidi run`'s terminal line, and a state.json written
by an older heidi still loadable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from heidi.loop import StageOutcome, apply_event, empty_state, usage_rule
from heidi.machine import Machine, check_state_file
from heidi.status import epoch_of, log_tail

from cli_helpers import clean_env
from helpers_loop import make_config

USAGE = [  # (stage, usage_delta) of four stages, as heidi.stages measures them
    ("generate", {"cpu_pct": 400.0, "system_cpu_pct": 90.0, "wall_ms": 1000.0, "cpu_user_s": 3.5,
                  "cpu_sys_s": 0.5, "peak_rss_kb": 100_000, "output_bytes": 10,
                  "memory_mb_delta": 5.0}),
    ("validate", {"cpu_pct": 99.0, "system_cpu_pct": 50.0, "wall_ms": 500.0, "cpu_user_s": 0.4,
                  "cpu_sys_s": 0.1, "peak_rss_kb": 30_000, "output_bytes": 5,
                  "memory_mb_delta": -1.0}),
    ("train", {"cpu_pct": 300.0, "system_cpu_pct": 80.0, "wall_ms": 2000.0, "cpu_user_s": 5.0,
               "cpu_sys_s": 1.0, "peak_rss_kb": 230_000, "output_bytes": 1000,
               "memory_mb_delta": 3.0}),
    ("eval", {"cpu_pct": 50.0, "system_cpu_pct": 10.0, "wall_ms": 100.0, "cpu_user_s": 0.05,
              "cpu_sys_s": 0.0, "peak_rss_kb": 20_000, "output_bytes": 0,
              "memory_mb_delta": 0.5}),
]


def _usage_runner(ctx, stage, round_):
    return StageOutcome(ok=True, usage_delta=dict(dict(USAGE)[stage]))


def test_usage_rules_by_key_name():
    assert [usage_rule(k) for k in ("wall_ms", "cpu_user_s", "output_bytes", "peak_rss_kb",
                                    "cpu_pct", "system_mem_available_kb_delta")] == \
        ["sum", "sum", "sum", "max", "last", "last"]


def test_usage_sums_amounts_keeps_peaks_and_percentages_per_stage(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=1)
    with Machine(cfg, stage_runner=_usage_runner).open() as m:
        m.start()
        while m.tick():
            pass
        state = m.state
    usage = state["usage"]
    assert usage["wall_ms"] == pytest.approx(3600.0)
    assert usage["cpu_user_s"] == pytest.approx(8.95) and usage["cpu_sys_s"] == pytest.approx(1.6)
    assert usage["output_bytes"] == 1015
    assert usage["peak_rss_kb"] == 230_000           # the largest stage, not 380,000 summed
    assert "cpu_pct" not in usage and "system_cpu_pct" not in usage  # 849% means nothing
    assert state["usage_by_stage"]["train"]["cpu_pct"] == 300.0
    assert state["usage_by_stage"]["eval"] == dict(USAGE)["eval"]
    # replay gives the same state: the rule is in the fold
    assert check_state_file(cfg.journal_path)[0] == "matches"
    replayed = empty_state()
    with open(cfg.journal_path, "rb") as fh:
        for line in fh:
            apply_event(replayed, orjson.loads(line))
    assert (replayed["usage"], replayed["usage_by_stage"]) == (usage, state["usage_by_stage"])


def test_a_state_json_of_an_older_heidi_is_loaded_and_rebuilt(tmp_path):
    cfg = make_config(tmp_path, ROUNDS=2)
    with Machine(cfg, stage_runner=_usage_runner).open() as m:
        m.start()
        for _ in range(4):
            m.tick()
    # what an older heidi wrote: usage summed whole, no usage_by_stage nor stage_started_at
    with open(cfg.state_path, "rb") as fh:
        old = orjson.loads(fh.read())
    del old["usage_by_stage"], old["stage_started_at"]
    old["usage"] = {"cpu_pct": 1103.0, "peak_rss_kb": 380_000, "wall_ms": 3600.0}
    with open(cfg.state_path, "wb") as fh:
        fh.write(orjson.dumps(old))
    assert check_state_file(cfg.journal_path)[0] == "matches"  # verify accepts it as it is
    proc = subprocess.run([sys.executable, "-m", "heidi", "status", "--json",
                           "--out-dir", cfg.out_dir], capture_output=True, env=clean_env())
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["usage_by_stage"] == {}
    with Machine(cfg, stage_runner=_usage_runner).open() as m:  # the next holder rebuilds it
        while m.tick():
            pass
    state = orjson.loads(open(cfg.state_path, "rb").read())
    assert state["status"] == "completed" and "cpu_pct" not in state["usage"]
    assert state["usage"]["peak_rss_kb"] == 230_000
    kinds = [orjson.loads(line)["event_type"] for line in open(cfg.journal_path, "rb")]
    assert "state_recovered" in kinds
    assert check_state_file(cfg.journal_path)[0] == "matches"


def test_epoch_of_reads_journal_timestamps():
    from heidi.clock import parse_ts
    for ts in ("2026-02-20T07:45:38.307Z", "2000-02-29T23:59:59.999Z", "1999-12-31T00:00:00.000Z"):
        assert epoch_of(ts) == pytest.approx(parse_ts(ts))
    assert epoch_of(None) is None and epoch_of("yesterday") is None


def test_log_tail_shows_lines_as_a_terminal_would(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"first\n\nstep 1/9\rstep 9/9\n\x1b[31mred\x1b[0m text\x07\n")
    assert log_tail(str(log)) == ["first", "step 9/9", "red text"]
    log.write_bytes(b"x" * 40_000 + b"\n" + b"last one\n")
    assert log_tail(str(log), 1) == ["last one"]
    assert log_tail(str(tmp_path / "missing.log")) == []


@pytest.fixture
def slow_stage(tmp_path):
    """A pipeline whose generate stage prints two lines (one with a secret), then waits for a
    file to exist before it exits."""
    release = tmp_path / "release"
    toml = tmp_path / "heidi.toml"
    toml.write_text(textwrap.dedent(f"""
        rounds = 1
        out_dir = "out"
        max_cpu_pct = 100
        max_mem_pct = 100
        [stages.generate]
        command = ["/bin/sh", "-c", "echo starting; echo 'token ghp_{'A' * 36} step 3/10'; while [ ! -e {release} ]; do sleep 0.1; done; exit 3"]
    """))
    env = clean_env(HEIDI_CONFIG=str(toml), HEIDI_FSYNC="0", HEIDI_KILL_GRACE_S="1")
    return tmp_path, env, release


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def _status(root, env, *args):
    return subprocess.run([sys.executable, "-m", "heidi", "status", *args], capture_output=True,
                          text=True, env=env, cwd=root, timeout=30)


def test_a_running_stage_is_visibly_alive_in_status(slow_stage):
    root, env, release = slow_stage
    run = subprocess.Popen([sys.executable, "-m", "heidi", "run"], env=env, cwd=root,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        def running():
            view = orjson.loads(_status(root, env, "--json").stdout)
            return view if view.get("stage_log_last_line", "") and "step 3/10" in view["stage_log_last_line"] else None
        view = _wait_for(running)
        assert view["holder_pid"] == run.pid and view["interrupted"] is False
        assert view["stage"] == "generate" and view["stage_status"] == "running"
        assert abs(epoch_of(view["stage_started_at"]) - time.time()) < 60
        assert 0 <= view["stage_elapsed_s"] <= view["run_elapsed_s"]
        assert view["stage_log"] == str(root / "out" / "logs" / "round_1" / "generate.log")
        assert view["stage_log_last_line"] == "token [GITHUB_TOKEN] step 3/10"  # redacted
        assert view["stage_log_tail"] == ["starting", "token [GITHUB_TOKEN] step 3/10"]
        assert view["actions"]["stop"] is None
        assert view["actions"]["resume"].endswith("is running already: nothing to resume")
        time.sleep(1.2)
        later = orjson.loads(_status(root, env, "--json").stdout)
        assert later["stage_elapsed_s"] > view["stage_elapsed_s"]
        text = _status(root, env)
        lines = text.stdout.splitlines()
        assert lines[0].startswith("run run_") and "stage generate" in lines[0]
        assert f"pid {run.pid}" in lines[1] and "running for" in lines[1]
        assert lines[2] == f"  log {view['stage_log']}"
        assert lines[3] == "  > token [GITHUB_TOKEN] step 3/10"
        # killed outright: the status says interrupted, and who would run it again
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        gone = orjson.loads(_status(root, env, "--json").stdout)
        assert gone["interrupted"] is True and gone["status"] == "interrupted"
        assert gone["holder_pid"] is None and gone["stage_elapsed_s"] is None
        assert gone["stage_started_at"] == view["stage_started_at"]
        assert "interrupted (no process holds the run)" in _status(root, env).stdout
    finally:
        release.touch()
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def _on_a_terminal(argv, env, cwd, until=None, timeout=60.0):
    """Run argv on a pseudo-terminal (80 columns); returns (exit code, what it printed). `until`:
    once the output contains it, the process gets SIGINT."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    out = b""
    end = time.monotonic() + timeout
    sent = False
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        if until is not None and not sent and until.encode() in out:
            os.kill(pid, signal.SIGINT)
            sent = True
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


def test_run_redraws_its_line_while_a_stage_runs(slow_stage):
    root, env, release = slow_stage
    # the stage prints and waits; once the line shows its log, the release file ends it
    code, out = _on_a_terminal([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, threading, time
        def release():
            time.sleep(3.5)
            open({str(release)!r}, "w").close()
        threading.Thread(target=release, daemon=True).start()
        sys.exit(subprocess.call([sys.executable, "-m", "heidi", "run"]))
    """)], env, root)
    assert code == 1  # the stage exits 3: the run fails, as it should
    frames = [f for f in out.split("\r") if f.strip()]
    alive = [f for f in frames if "(generate)" in f and " · token [GITHUB_TOKE" in f]
    assert len(alive) >= 2, out  # redrawn every second during the stage, not only between stages
    assert all(" · pid " in f and " · run " in f for f in alive)  # elapsed, pid, last log line
    assert all(len(f.rstrip()) < 80 for f in frames if "\n" not in f)  # cut to the width


def test_status_watch_redraws_in_place_and_ends_on_ctrl_c(slow_stage):
    root, env, _ = slow_stage
    subprocess.run([sys.executable, "-m", "heidi", "start"], env=env, cwd=root, check=True,
                   capture_output=True)
    code, out = _on_a_terminal([sys.executable, "-m", "heidi", "status", "--watch", "0.2"], env,
                               root, until="\x1b[1F")
    assert code == 0, out
    assert out.count("run run_") >= 2 and "\x1b[1F\x1b[J" in out  # moved up one row, redrawn
    # not a terminal: the same status, repeated
    proc = subprocess.Popen([sys.executable, "-m", "heidi", "status", "--watch", "0.2"], env=env,
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and err == ""
    assert out.count("run run_") >= 2 and "\x1b" not in out
    assert _status(root, env, "--watch", "0").returncode == 2
