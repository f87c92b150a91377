"""A full disk is a wait, not a crash: on a small tmpfs filled up, heidi's writes fail with
ENOSPC and must leave the journal and state.json as they were (no torn line, no tmp file, no
event per failing tick), name their path in one line, and -- under the daemon -- wait until
space returns, then finish the run.

Needs root (mount -t tmpfs); skipped with the reason otherwise. Every mount is undone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from heidi.errors import RunLocked
from heidi.lock import lock_holder

from helpers_loop import make_config
from test_daemon import Daemon, daemon_env, get_json, heidi, request, wait_for

FS_BYTES = 2 * 1024 * 1024
ENOSPC_TEXT = os.strerror(errno.ENOSPC)


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs at tmp_path/fs, unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs, name: str = "filler") -> str:
    """Take every free byte of fs (64 KiB writes, then single bytes: a page at a time)."""
    path = os.path.join(fs, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return path


def tmp_files(directory) -> list[str]:
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def whole_lines(path) -> list[dict]:
    """Every line of a journal, each ending in a newline (no torn line)."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert data.endswith(b"\n"), data[-200:]
    return [orjson.loads(line) for line in data.splitlines()]


# -- the journal writer and state.json, in process (both twins of the atomic writes) ----------

def test_short_write_is_cut_back_and_written_again(twin, small_fs):
    from heidi.journal import JournalWriter, verify_journal
    path = os.path.join(small_fs, "events.jsonl")
    writer = JournalWriter(path, "run_diskfull", batch=True)
    writer.emit("pipeline_start", "start")
    writer.sync()
    before = open(path, "rb").read()
    filler = fill(small_fs)
    # the page the journal ends in has room for part of the next line, not all of it: the
    # kernel takes what fits (a short write), then ENOSPC
    slack = -len(before) % 4096
    line = b""
    while len(line) <= slack:  # one transition's lines, written with one write(2)
        line += writer.emit("stage_start", "x" * 400)
    assert 0 < slack < len(line)
    for _ in range(3):
        with pytest.raises(OSError) as info:
            writer.sync()
        assert info.value.errno == errno.ENOSPC and info.value.filename == path
        assert open(path, "rb").read() == before  # no torn line left behind, retry after retry
    assert writer.pending  # the line is held, not lost
    os.unlink(filler)
    writer.sync()
    writer.close()
    assert open(path, "rb").read() == before + line
    assert verify_journal(path)[0] == writer.count


def test_state_json_write_on_a_full_disk(twin, small_fs):
    from heidi.status import StatusWriter
    path = os.path.join(small_fs, "state.json")
    writer = StatusWriter(path)
    writer.write({"run_id": "r", "state": "IDLE"})
    fill(small_fs)
    with pytest.raises(OSError) as info:
        writer.write({"run_id": "r", "state": "COLLECTING", "pad": "y" * 8192})
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert orjson.loads(open(path, "rb").read()) == {"run_id": "r", "state": "IDLE"}  # whole
    assert tmp_files(small_fs) == []


def test_io_errors_name_their_path(twin, small_fs):
    from heidi import control
    from heidi.errors import one_line
    from heidi.lock import RunLock
    from heidi.split import split_file
    from heidi.stagelog import StageLog
    data = os.path.join(small_fs, "data")
    os.mkdir(data)
    source = os.path.join(data, "clean.jsonl")
    with open(source, "wb") as fh:
        fh.writelines(b'{"i": %d, "pad": "%s"}\n' % (i, b"z" * 200) for i in range(400))
    os.mkdir(os.path.join(small_fs, "control"))
    fill(small_fs)

    train, val = os.path.join(data, "train.jsonl"), os.path.join(data, "val.jsonl")
    with pytest.raises(OSError) as info:
        split_file(source, train, val, 0.5, seed=1, fsync=False)
    assert info.value.errno == errno.ENOSPC and info.value.filename in (train, val)
    assert sorted(os.listdir(data)) == ["clean.jsonl"]  # no output, no tmp file left

    with pytest.raises(OSError) as info:
        control.request(os.path.join(small_fs, "control"), "pause")
    assert info.value.filename.startswith(os.path.join(small_fs, "control") + os.sep)
    assert one_line(info.value) == f"{info.value.filename}: {ENOSPC_TEXT}"
    assert os.listdir(os.path.join(small_fs, "control")) == []

    lock = os.path.join(small_fs, "heidi.lock")
    held = RunLock(lock).acquire()  # a new lock file: its pid record needs a page, the lock not
    try:
        assert os.path.getsize(lock) == 0 and lock_holder(lock) == os.getpid()
        with pytest.raises(RunLocked):
            RunLock(lock).acquire()
    finally:
        held.release()

    log_path = os.path.join(small_fs, "logs", "generate.log")
    os.unlink(os.path.join(small_fs, "filler"))
    os.makedirs(os.path.dirname(log_path))
    fill(small_fs)
    log = StageLog(log_path, lambda s: s)
    log.write(b"a line the disk has no room for\n" * 200)
    log.close()
    assert log.error == f"cannot write stage log {log_path}: {ENOSPC_TEXT}"
    assert log.tail(100).endswith("no room for\n")  # the tail goes on in memory


def test_one_line_of_an_oserror():
    from heidi.errors import one_line
    assert one_line(OSError(errno.ENOSPC, ENOSPC_TEXT, "/d/state.json")) == \
        f"/d/state.json: {ENOSPC_TEXT}"
    assert one_line(OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")) == \
        f"/a -> /b: {os.strerror(errno.EXDEV)}"


# -- cron: failing ticks append nothing ----------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    return daemon_env(HEIDI_MODE="full", ROUNDS="1", HEIDI_FSYNC="1", **extra)


@pytest.mark.parametrize("behind", [False, True], ids=["state-current", "state-behind"])
def test_failing_ticks_append_nothing(small_fs, tmp_path, behind):
    out = str(small_fs / "out")
    env = _env()
    assert heidi(["start", "--out-dir", out], env, str(tmp_path)).returncode == 0
    state_path = os.path.join(out, "state.json")
    old_state = open(state_path, "rb").read()
    assert heidi(["tick", "--out-dir", out], env, str(tmp_path)).returncode == 0
    if behind:
        # as after a crash (or a full disk) between the journal and state.json: the next tick
        # has to catch state.json up, and cannot write it
        with open(state_path, "wb") as fh:
            fh.write(old_state)
    journal = os.path.join(out, "events.jsonl")
    before = open(journal, "rb").read()
    filler = fill(small_fs)
    for _ in range(3):
        done = heidi(["tick", "--out-dir", out], env, str(tmp_path))
        assert done.returncode == 1, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        where = state_path if behind else out
        assert lines[0] == f"heidi: {where}: {ENOSPC_TEXT}"
        assert open(journal, "rb").read() == before  # byte for byte
        assert tmp_files(out) == []
    os.unlink(filler)
    done = heidi(["tick", "--out-dir", out, "--steps", "50"], env, str(tmp_path))
    assert done.returncode == 0, done.stderr
    kinds = [e["event_type"] for e in whole_lines(journal)]
    assert kinds[-1] == "pipeline_complete" and "state_recovered" not in kinds
    done = heidi(["verify", "--out-dir", out], env, str(tmp_path))
    assert done.returncode == 0 and done.stdout.startswith("OK:"), done.stdout


def test_tick_whose_stage_ran_waits_to_journal_its_outcome(small_fs, capsys):
    """The disk fills while a stage runs: the tick waits (one line on stderr) and journals
    the outcome once there is space, rather than losing what the stage did."""
    import threading

    from heidi.machine import Machine, mock_stage
    cfg = make_config(small_fs, ROUNDS=1, HEIDI_FSYNC=True)
    fillers: list[str] = []

    def fills_the_disk(ctx, stage, round_):
        if stage == "validate":
            fillers.append(fill(small_fs))
        return mock_stage(ctx, stage, round_)

    with Machine(cfg, stage_runner=fills_the_disk) as m:
        m.start()
        m.tick()
        journal_before = open(cfg.journal_path, "rb").read()
        freed = threading.Timer(3.0, lambda: os.unlink(fillers[0]))
        freed.start()
        try:
            started = time.monotonic()
            assert m.tick()  # validate: fills the disk, then waits for space to journal
        finally:
            freed.cancel()
        assert time.monotonic() - started >= 2.5
        assert m.disk_wait is None  # a tick waits only for a stage's outcome
    events = whole_lines(cfg.journal_path)
    assert open(cfg.journal_path, "rb").read().startswith(journal_before)
    assert [(e["event_type"], e["stage"]) for e in events[-3:]] == [
        ("stage_start", "validate"), ("script_success", "validate"), ("stage_end", "validate")]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"heidi: disk full: {small_fs}") and ENOSPC_TEXT in err[0], err
    assert err[-1].startswith("heidi: space is back after"), err


# -- the daemon waits, serves, and finishes the run ----------------------------------------------

FILL_THEN_TALK = textwrap.dedent("""\
    import errno, os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for chunk in (b"\\0" * 65536, b"\\0"):
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    os.close(fd)
    for i in range(200):
        print("generated sample", i, "of a stage whose log has no room")
""")


def _pipeline(small_fs, tmp_path) -> tuple[str, dict[str, str], str]:
    """(heidi.toml, env, filler path) of a real 1-round pipeline whose generate stage fills the
    small filesystem, then prints 200 lines its log has no room for."""
    filler = str(small_fs / "filler")
    script = tmp_path / "fill_then_talk.py"  # outside the small filesystem
    script.write_text(FILL_THEN_TALK)
    rows = tmp_path / "rows.py"
    rows.write_text("import sys\nwith open(sys.argv[1], 'w') as fh:\n"
                    "    fh.writelines(f'{{\"n\": {i}}}\\n' for i in range(10))\n")
    (tmp_path / "heidi.toml").write_text(textwrap.dedent(f"""\
        [stages.generate]
        command = ["{{python}}", "{script}", "{filler}"]
        [stages.validate]
        command = ["{{python}}", "{rows}", "{{data_dir}}/clean_round_{{round}}.jsonl"]
        [stages.train]
        command = ["{{python}}", "-c", "print('trained')"]
        [stages.eval]
        command = ["{{python}}", "-c", "print('evaluated')"]
        """))
    env = _env(HEIDI_MOCK_SUBPROCESSES=None, HEIDI_PYTHON=sys.executable, MAX_CPU_PCT="100",
               MAX_MEM_PCT="100")
    return str(tmp_path / "heidi.toml"), env, filler


def test_daemon_waits_out_a_full_disk(small_fs, tmp_path):
    out = str(small_fs / "out")
    config, env, filler = _pipeline(small_fs, tmp_path)
    d = Daemon(tmp_path, env, "--config", config, out="fs/out")
    try:
        d.wait_listening()
        view = d.wait_status(lambda v: bool(v.get("waiting")), timeout=30, what="a wait on the full disk")
        assert view["waiting"].startswith(f"disk full: {out}") and ENOSPC_TEXT in view["waiting"]
        assert "(since " in view["waiting"]
        for _ in range(5):  # alive and answering, fast, while it waits
            started = time.monotonic()
            code, again = get_json(d.port, "/api/v1/status", timeout=1.0)
            assert code == 200 and again["waiting"] and time.monotonic() - started < 1.0
            assert d.proc.poll() is None
            time.sleep(0.2)
        shown = heidi(["status", "--out-dir", out], env, str(tmp_path))
        assert f"waiting: disk full: {out}" in shown.stdout, shown.stdout + shown.stderr
        code, _, body = request(d.port, "POST", "/api/v1/action/pause")
        assert code == 507 and ENOSPC_TEXT in orjson.loads(body)["error"], body
        assert "disk full" in d.stderr()
        os.unlink(filler)
        view = d.wait_status(lambda v: v["status"] == "completed", timeout=60, what="the run to complete")
        assert view["waiting"] is None
        assert d.terminate() == 0
    finally:
        d.kill()
    events = whole_lines(os.path.join(out, "events.jsonl"))
    kinds = [e["event_type"] for e in events]
    assert kinds[-1] == "pipeline_complete" and "state_recovered" not in kinds
    warned = [e for e in events if e["event_type"] == "stage_log_failed"]
    log_path = os.path.join(out, "logs", "round_1", "generate.log")
    assert len(warned) == 1 and warned[0]["stage"] == "generate" and log_path in warned[0]["message"]
    assert kinds.count("script_success") == 4  # generate's outcome journaled, not run again
    assert tmp_files(out) == []
    done = heidi(["verify", "--out-dir", out], env, str(tmp_path))
    assert done.returncode == 0 and "behind" not in done.stdout, done.stdout + done.stderr
    assert "space is back" in d.stderr()


def test_sigterm_while_waiting_leaves_the_run_interrupted(small_fs, tmp_path):
    out = str(small_fs / "out")
    config, env, filler = _pipeline(small_fs, tmp_path)
    d = Daemon(tmp_path, env, "--config", config, out="fs/out")
    try:
        d.wait_listening()
        d.wait_status(lambda v: bool(v.get("waiting")), timeout=30, what="a wait on the full disk")
        started = time.monotonic()
        assert d.terminate() == 0
        assert time.monotonic() - started < 3.0  # the wait looks at signals 4 times a second
    finally:
        d.kill()
    assert "SIGTERM received" in d.stderr()
    journal = os.path.join(out, "events.jsonl")
    whole_lines(journal)
    done = heidi(["verify", "--out-dir", out], env, str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert tmp_files(out) == []
    os.unlink(filler)


@contextlib.contextmanager
def _run_waiting_for_space(tmp_path, env: dict[str, str], out: str, *args: str):
    """`heidi run` (in its own session), once it says it waits for space: (the process, its
    stderr's file). Killed, with its group, on the way out if it still runs."""
    err_path = tmp_path / "run.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "heidi", "run", "--out-dir", out, *args],
                                env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_for(lambda: b"disk full" in err_path.read_bytes() or proc.poll() is not None,
                 timeout=30, what="heidi run to wait for space")
        assert proc.poll() is None, err_path.read_text()
        yield proc, err_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)


def test_heidi_run_waits_out_a_full_disk(small_fs, tmp_path):
    out = str(small_fs / "out")
    config, env, filler = _pipeline(small_fs, tmp_path)
    with _run_waiting_for_space(tmp_path, env, out, "--config", config) as (proc, err_path):
        first = err_path.read_text().splitlines()[0]
        assert first.startswith(f"heidi: disk full: {out}") and ENOSPC_TEXT in first
        os.unlink(filler)
        assert proc.wait(60) == 0, err_path.read_text()
    assert "space is back" in err_path.read_text()
    kinds = [e["event_type"] for e in whole_lines(os.path.join(out, "events.jsonl"))]
    assert kinds[-1] == "pipeline_complete" and kinds.count("script_success") == 4
    done = heidi(["verify", "--out-dir", out], env, str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_heidi_run_in_a_new_out_dir_on_a_full_disk_waits(small_fs, tmp_path):
    """Full before anything of the run exists: the lock file cannot take its pid record, and that
    is no reason to give up -- the lock is held all the same, and `heidi run` waits to journal
    its start as it waits for any write. `heidi start` (which does not wait) names the path."""
    out = str(small_fs / "out")
    env = _env()
    filler = fill(small_fs)
    done = heidi(["start", "--out-dir", out], env, str(tmp_path))
    assert done.returncode == 1
    assert done.stderr == f"heidi: {os.path.join(out, 'events.jsonl')}: {ENOSPC_TEXT}\n"
    assert os.path.getsize(os.path.join(out, "events.jsonl")) == 0
    with _run_waiting_for_space(tmp_path, env, out) as (proc, err_path):
        lock = os.path.join(out, "heidi.lock")
        status = heidi(["status", "--out-dir", out], env, str(tmp_path))
        assert status.returncode == 0 and status.stdout.startswith(f"no run in {out}")
        assert os.path.getsize(lock) == 0  # no pid record: the holder is found in /proc/locks
        assert lock_holder(lock) == proc.pid
        os.unlink(filler)
        assert proc.wait(60) == 0, err_path.read_text()
    kinds = [e["event_type"] for e in whole_lines(os.path.join(out, "events.jsonl"))]
    assert kinds[0] == "pipeline_start" and kinds[-1] == "pipeline_complete"
    assert heidi(["verify", "--out-dir", out], env, str(tmp_path)).returncode == 0


# -- DiskWait: which errors are waits ----------------------------------------------------------

def test_diskwait_retries_only_a_full_disk():
    from heidi.interrupt import Interrupt, Interrupted
    from heidi.waiting import DiskWait
    logged: list[str] = []
    wait = DiskWait(Interrupt(), logged.append, first_s=0.01, max_s=0.02)
    calls = []

    def full_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/events.jsonl")
        return "written"

    assert wait.run(full_twice) == "written" and len(calls) == 3
    assert wait.waiting is None
    assert logged[0].startswith(f"disk full: /q/events.jsonl: {os.strerror(errno.EDQUOT)} (since ")
    assert logged[-1].startswith("space is back after") and len(logged) == 2

    def broken():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/q/state.json")
    with pytest.raises(OSError) as info:
        wait.run(broken)  # not a wait: at once, as it came
    assert info.value.errno == errno.EIO and wait.waiting is None

    interrupt = Interrupt()
    wait = DiskWait(interrupt, logged.append, first_s=10.0)

    def full():
        interrupt.set(15)
        raise OSError(errno.ENOSPC, ENOSPC_TEXT, "/q")
    started = time.monotonic()
    with pytest.raises(Interrupted):
        wait.run(full)
    assert time.monotonic() - started < 1.0


def test_daemon_loop_ends_on_another_io_error_with_one_line(tmp_path, capsys):
    """EIO is not a wait: the loop ends (the daemon exits 1) with one line naming the path."""
    from types import SimpleNamespace

    from heidi.daemon.service import Daemon as DaemonService
    service = DaemonService(make_config(tmp_path))
    journal = str(tmp_path / "out" / "events.jsonl")

    def tick():
        raise OSError(errno.EIO, os.strerror(errno.EIO), journal)

    machine = SimpleNamespace(apply_requests=lambda: None, tick=tick, state={
        "status": "running", "paused": False, "state": "COLLECTING"})
    service._loop(machine)  # type: ignore[arg-type]
    assert service.loop_error == f"{journal}: {os.strerror(errno.EIO)}"
    assert capsys.readouterr().err == f"heidi daemon: the loop failed: {service.loop_error}\n"
