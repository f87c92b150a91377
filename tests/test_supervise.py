"""Stage supervision (both twins) and StageLog: exit codes, output, timeouts, stop, spawn errors,
and above all that no process of a stage survives a timeout, a callback error, or heidi's death."""
from __future__ import annotations

import inspect
import itertools
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest

from heidi._fast import _supervise_cgroup, _supervise_core, _supervise_watchdog
from heidi._fast._supervise_types import StageResult
from heidi.stagelog import MAX_LINE_BYTES, StageLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers_children.py")
PY = sys.executable
# Every stage these tests start inherits this marker, so leftovers can be found in /proc.
MARK = f"HEIDI_TEST_SUPERVISE={uuid.uuid4().hex}"


# ---- process bookkeeping ----------------------------------------------------------------------

def _state(pid: int) -> str | None:
    """Process state letter, or None if gone. Zombies ("Z") count as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:][:1].decode()


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rfind(b")") + 2:].split()[1]) == pid:
                found.append(int(name))
    return found


def _marked_pids() -> list[int]:
    needle = b"\0" + MARK.encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if needle in env and _alive(int(name)):
            found.append(int(name))
    return found


def _wait_dead(pids, within_s: float) -> list[int]:
    give_up = time.monotonic() + within_s
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() >= give_up:
            return alive
        time.sleep(0.02)


@pytest.fixture(autouse=True, params=["cg", "pg"])
def containment(request, monkeypatch):
    """Every test runs with stages in cgroups ("cg", skipped where none can be made) and with
    cgroups off (HEIDI_CGROUP=0: process groups + subreaper)."""
    _supervise_cgroup.reset()
    if request.param == "pg":
        monkeypatch.setenv(_supervise_cgroup.ENV, "0")
    else:
        monkeypatch.delenv(_supervise_cgroup.ENV, raising=False)
        where = _supervise_cgroup.containment()
        if where.kind != "cgroup":
            pytest.skip(f"no stage cgroups here: {where.reason}")
    yield request.param
    _supervise_cgroup.reset()


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch, containment):
    """Every stage started by a test carries MARK; none may still run after the test."""
    key, value = MARK.split("=")
    monkeypatch.setenv(key, value)
    yield
    left = _wait_dead(_marked_pids(), 1.0)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def _read_pids(path, timeout_s: float = 10.0) -> list[int]:
    give_up = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < give_up, "the stage never wrote its pids"
        time.sleep(0.01)
    with open(path) as f:
        return [int(x) for x in f.read().split()]


class Collect:
    def __init__(self):
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


# ---- the twins ---------------------------------------------------------------------------------

def test_twins_have_the_same_api(fast_impl, impl_kind):
    mod = fast_impl("supervise")
    assert mod.COMPILED is (impl_kind == "c")
    from heidi._fast import _supervise_py
    ref = inspect.signature(_supervise_py.run_supervised).parameters
    got = inspect.signature(mod.run_supervised).parameters
    assert [(p.name, p.kind, p.default) for p in got.values()] == \
        [(p.name, p.kind, p.default) for p in ref.values()]
    assert mod.StageResult is StageResult


def test_selector_honours_no_extensions():
    code = ("from heidi._fast import supervise, procstat; "
            "print(supervise.COMPILED, procstat.COMPILED)")
    out = subprocess.run([PY, "-c", code], env=_env(HEIDI_NO_EXTENSIONS="1"), check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


# ---- ordinary runs -----------------------------------------------------------------------------

def test_exit_code_and_merged_output_in_order(fast_impl):
    mod = fast_impl("supervise")
    out = Collect()
    r = mod.run_supervised(["sh", "-c", "echo one; echo two >&2; echo three; exit 3"],
                           on_output=out)
    assert out.data == b"one\ntwo\nthree\n"
    assert (r.exit_code, r.signal, r.timed_out, r.stopped, r.spawn_error) == (3, None, False,
                                                                              False, None)
    assert r.output_bytes == len(out.data) and not r.ok
    assert r.describe() == "exited with code 3"
    assert r.pid > 0 and r.wall_ms > 0


def test_success_is_ok(fast_impl):
    r = fast_impl("supervise").run_supervised(["/bin/true"])
    assert r.ok and r.exit_code == 0 and r.describe() == "exited with code 0"


def test_killed_by_signal(fast_impl):
    r = fast_impl("supervise").run_supervised(["sh", "-c", "kill -KILL $$"])
    assert r.signal == signal.SIGKILL and r.exit_code is None and not r.ok
    assert r.describe() == "killed by signal SIGKILL"


def test_large_output_arrives_whole(fast_impl):
    out = Collect()
    code = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 20480)"  # 5 MiB
    r = fast_impl("supervise").run_supervised([PY, "-c", code], on_output=out)
    assert r.ok and r.output_bytes == 5 * 1024 * 1024
    assert out.data == bytes(range(256)) * 20480


def test_stdin_is_dev_null_and_only_fds_0_1_2(fast_impl):
    out = Collect()
    code = ("import os, sys; print(repr(sys.stdin.read()), os.readlink('/proc/self/fd/0'), "
            "sorted(int(f) for f in os.listdir('/proc/self/fd')))")
    r = fast_impl("supervise").run_supervised([PY, "-c", code], on_output=out)
    assert r.ok
    # fd 3 is the directory listdir itself has open.
    assert out.data.decode().split(" ", 2) == ["''", "/dev/null", "[0, 1, 2, 3]\n"]


def test_own_session_and_process_group(fast_impl):
    out = Collect()
    code = "import os; print(os.getpid() == os.getsid(0) == os.getpgid(0), os.getsid(0))"
    r = fast_impl("supervise").run_supervised([PY, "-c", code], on_output=out)
    same, sid = out.data.split()
    assert r.ok and same == b"True" and int(sid) != os.getsid(0)


def test_env_is_exactly_what_was_given_plus_the_stage_token(fast_impl):
    out = Collect()
    r = fast_impl("supervise").run_supervised(["/usr/bin/env"], env={"ONLY": "this", "X": "é"},
                                              on_output=out)
    assert r.ok
    lines = sorted(out.data.decode().splitlines())
    assert lines[0].startswith(f"{_supervise_core.TOKEN_ENV}=")
    assert lines[1:] == ["ONLY=this", "X=é"]


def test_env_none_inherits_os_environ_as_it_is_now(fast_impl, monkeypatch):
    mod = fast_impl("supervise")
    mod.run_supervised(["true"])  # the watchdog is forked before K9 is set ...
    monkeypatch.setenv("K9", "now")  # ... and yet the stage must see it
    out = Collect()
    r = mod.run_supervised([PY, "-c", "import os; print(os.environ['K9'])"], on_output=out)
    assert r.ok and out.data == b"now\n"


def test_path_lookup_uses_the_stage_env(fast_impl, tmp_path):
    tool = tmp_path / "heidi-test-tool"
    tool.write_text("#!/bin/sh\necho found-it\n")
    tool.chmod(0o755)
    out = Collect()
    r = fast_impl("supervise").run_supervised(
        ["heidi-test-tool"], env={"PATH": f"/nonexistent:{tmp_path}"}, on_output=out)
    assert r.ok and out.data == b"found-it\n"


def test_cwd(fast_impl, tmp_path):
    out = Collect()
    r = fast_impl("supervise").run_supervised(["pwd"], cwd=str(tmp_path), on_output=out)
    assert r.ok and out.data.decode().strip() == str(tmp_path)


def test_rlimits_apply_in_the_stage(fast_impl):
    out = Collect()
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    r = fast_impl("supervise").run_supervised([PY, "-c", code], on_output=out,
                                              rlimits={resource.RLIMIT_NOFILE: (64, 64)})
    assert r.ok and out.data == b"(64, 64)\n"
    assert resource.getrlimit(resource.RLIMIT_NOFILE) != (64, 64)  # not heidi's own


def test_rusage_of_the_stage(fast_impl):
    code = ("import time; b = bytearray(80 * 1024 * 1024); t = time.process_time()\n"
            "while time.process_time() - t < 0.15: pass")
    r = fast_impl("supervise").run_supervised([PY, "-c", code])
    assert r.ok
    assert r.peak_rss_kb >= 80 * 1024
    assert r.cpu_user_s + r.cpu_sys_s >= 0.1


# Signals a program can set. glibc's posix_spawn leaves its two internal signals (32, 33: thread
# cancellation, setxid) ignored in the child; glibc itself refuses them to any program.
_SETTABLE = sum(1 << (sig - 1) for sig in _supervise_watchdog.SIGNALS_TO_DEFAULT)


def _signal_sets(status: bytes) -> dict[str, int]:
    """SigIgn and SigBlk of a /proc/PID/status, as bit masks of settable signals."""
    fields = {}
    for line in status.decode().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigIgn", "SigBlk"):
            fields[key] = int(value, 16) & _SETTABLE
    return fields


@pytest.mark.parametrize("where", ["main thread", "other thread"])
def test_a_stage_starts_with_every_signal_at_its_default(fast_impl, tmp_path, where):
    # heidi under nohup (SIGHUP ignored), started with `&` from a script (SIGINT ignored), a
    # signal blocked in the supervising thread: the stage inherits none of it, with either twin,
    # with a working directory (as stages.py always gives) or without.
    mod = fast_impl("supervise")
    seen = {}

    def supervise():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        try:
            for cwd in (str(tmp_path), None):
                out = Collect()
                r = mod.run_supervised(["cat", "/proc/self/status"], cwd=cwd, env=_env(),
                                       on_output=out, timeout_s=60)
                seen[cwd] = (r.exit_code, _signal_sets(out.data))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGHUP, signal.SIGINT)}
    try:
        if where == "main thread":
            supervise()
        else:
            thread = threading.Thread(target=supervise)
            thread.start()
            thread.join(120)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    assert seen == {cwd: (0, {"SigIgn": 0, "SigBlk": 0}) for cwd in (str(tmp_path), None)}


# ---- cannot start ------------------------------------------------------------------------------

def test_missing_executable_is_a_result_not_an_exception(fast_impl):
    r = fast_impl("supervise").run_supervised(["python9-does-not-exist", "x"])
    assert r.spawn_error == "cannot execute 'python9-does-not-exist': No such file or directory"
    assert r.exit_code is None and r.pid is None and not r.ok
    assert r.describe() == r.spawn_error


def test_not_executable(fast_impl, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    r = fast_impl("supervise").run_supervised([str(script)])
    assert r.spawn_error == f"cannot execute '{script}': Permission denied"


def test_bad_cwd(fast_impl, tmp_path):
    r = fast_impl("supervise").run_supervised(["true"], cwd=str(tmp_path / "nope"))
    assert r.spawn_error == f"cannot change directory to '{tmp_path / 'nope'}': " \
                            "No such file or directory"


def test_bad_rlimit_is_a_spawn_error(fast_impl):
    r = fast_impl("supervise").run_supervised(
        ["true"], rlimits={resource.RLIMIT_NOFILE: (100, 10)})
    assert r.spawn_error == "cannot set RLIMIT_NOFILE to (100, 10): Invalid argument"


def test_caller_errors_raise(fast_impl):
    mod = fast_impl("supervise")
    with pytest.raises(ValueError):
        mod.run_supervised([])
    with pytest.raises(ValueError):
        mod.run_supervised(["true"], env={"A=B": "x"})
    with pytest.raises(ValueError):
        mod.run_supervised(["tr\0ue"])
    with pytest.raises(ValueError):
        mod.run_supervised(["true"], grace_s=-1)


# ---- ending a stage ----------------------------------------------------------------------------

def test_timeout_sigterm_is_enough(fast_impl):
    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised(["sleep", "30"], timeout_s=0.3, grace_s=5)
    assert time.monotonic() - t0 < 2.0
    assert r.timed_out and r.timeout_s == 0.3 and r.signal == signal.SIGTERM and not r.ok
    assert r.describe() == "timed out after 0.3 s"


def test_timeout_kills_a_stubborn_tree_with_escaped_grandchildren(fast_impl, tmp_path):
    pidfile = str(tmp_path / "pids")
    out = Collect()
    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised([PY, HELPER, "tree", pidfile], timeout_s=0.4,
                                              grace_s=0.2, on_output=out)
    elapsed = time.monotonic() - t0
    pids = _read_pids(pidfile)
    assert out.data == b"ready\n"
    assert r.timed_out and r.signal == signal.SIGKILL  # it ignored SIGTERM
    assert 0.6 <= elapsed < 2.5
    # W reports only once no process of the stage is left: nothing to wait for here.
    assert [p for p in pids if _alive(p)] == []


def test_leftovers_of_a_finished_stage_are_killed(fast_impl, tmp_path):
    pidfile = str(tmp_path / "pids")
    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised([PY, HELPER, "tree", pidfile, "exit"], grace_s=0.3)
    assert r.ok  # the main process's own exit code is the result
    assert time.monotonic() - t0 < 2.5
    assert [p for p in _read_pids(pidfile) if _alive(p)] == []


def test_a_stage_that_closes_its_output_early_is_waited_for(fast_impl):
    out = Collect()
    r = fast_impl("supervise").run_supervised(
        ["sh", "-c", "echo bye; exec >&- 2>&-; sleep 0.3; exit 4"], on_output=out)
    assert out.data == b"bye\n" and r.exit_code == 4 and r.wall_ms >= 300


def test_output_of_a_background_child_is_captured_until_it_is_killed(fast_impl):
    out = Collect()
    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised(
        ["sh", "-c", "(sleep 0.2; echo late; sleep 30) & echo main"], on_output=out,
        grace_s=0.5)
    # The main process ends at once; what it left behind runs on until heidi has looked, then
    # gets SIGTERM: "late" may or may not make it, "main" always does, and nothing waits 30 s.
    assert r.ok and out.data.startswith(b"main\n") and time.monotonic() - t0 < 3


def test_should_stop(fast_impl):
    calls = []

    def stop():
        calls.append(time.monotonic())
        return len(calls) >= 3

    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised(["sleep", "30"], should_stop=stop,
                                              check_interval_s=0.05, grace_s=1)
    assert r.stopped and not r.timed_out and r.describe() == "stopped"
    assert len(calls) == 3 and time.monotonic() - t0 < 1.5
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(calls))


@pytest.mark.parametrize("where", ["on_output", "should_stop"])
def test_callback_exception_terminates_then_propagates(fast_impl, tmp_path, where):
    class Boom(Exception):
        pass

    def boom(*args):
        raise Boom()

    pidfile = str(tmp_path / "pids")
    kwargs = {where: boom, "check_interval_s": 0.05, "grace_s": 0.2}
    with pytest.raises(Boom):
        fast_impl("supervise").run_supervised([PY, HELPER, "tree", pidfile], **kwargs)
    if os.path.exists(pidfile):
        assert [p for p in _read_pids(pidfile) if _alive(p)] == []


def test_wait_releases_the_gil(fast_impl):
    count = 0
    done = threading.Event()

    def spin():
        nonlocal count
        while not done.is_set():
            count += 1

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        r = fast_impl("supervise").run_supervised(["sleep", "0.2"])
    finally:
        done.set()
        thread.join()
    assert r.ok and count > 10_000


def test_concurrent_stages_from_threads_do_not_touch_each_other(fast_impl, tmp_path):
    mod = fast_impl("supervise")
    results = {}
    pidfile = str(tmp_path / "pids")

    def run(name, argv, **kw):
        results[name] = mod.run_supervised(argv, **kw)

    threads = [threading.Thread(target=run, args=("tree", [PY, HELPER, "tree", pidfile]),
                                kwargs={"timeout_s": 0.3, "grace_s": 0.1}),
               threading.Thread(target=run, args=("calm", ["sleep", "0.6"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["tree"].timed_out
    assert results["calm"].ok  # killing the other stage's tree left this one alone
    assert [p for p in _read_pids(pidfile) if _alive(p)] == []


def test_concurrent_stages_an_env_less_escapee_goes_with_the_last_stage(fast_impl, tmp_path):
    # While two stages run, an adopted orphan without a token cannot be told apart: it is not
    # the timed-out stage's to kill, but it is gone once the last stage has ended.
    mod = fast_impl("supervise")
    results = {}
    pidfile = str(tmp_path / "pids")

    def run(name, argv, **kw):
        results[name] = mod.run_supervised(argv, **kw)

    calm = threading.Thread(target=run, args=("calm", ["sleep", "1"]), kwargs={"grace_s": 0.2})
    calm.start()
    time.sleep(0.05)
    run("tree", [PY, HELPER, "tree", pidfile, "noenv"], timeout_s=0.4, grace_s=0.1)
    calm.join()
    assert results["tree"].timed_out and results["calm"].ok
    assert [p for p in _read_pids(pidfile) if _alive(p)] == []


# ---- the watchdog --------------------------------------------------------------------------------

def test_stage_dies_with_a_sigkilled_supervisor(fast_impl, impl_kind, tmp_path):
    fast_impl("supervise")  # skips the c variant when it is not built
    pidfile, wdfile = str(tmp_path / "pids"), str(tmp_path / "wd")
    parent = subprocess.Popen([PY, HELPER, "supervisor", impl_kind, pidfile, wdfile],
                              env=_env(), stdin=subprocess.DEVNULL)
    try:
        pids = _read_pids(pidfile)
        watchdog = _read_pids(wdfile)[0]
        assert all(_alive(p) for p in pids + [watchdog])
    finally:
        parent.kill()
        parent.wait()
    assert _wait_dead(pids + [watchdog], 2.0) == []


def test_ctrl_c_terminates_the_stage_then_propagates(fast_impl, impl_kind, tmp_path):
    fast_impl("supervise")
    pidfile, wdfile = str(tmp_path / "pids"), str(tmp_path / "wd")
    parent = subprocess.Popen([PY, HELPER, "supervisor", impl_kind, pidfile, wdfile, "0.2"],
                              env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        pids = _read_pids(pidfile)
        parent.send_signal(signal.SIGINT)
        out, _ = parent.communicate(timeout=10)
    finally:
        parent.kill()
        parent.wait()
    assert (parent.returncode, out) == (130, b"interrupted\n")
    assert [p for p in pids if _alive(p)] == []  # gone before KeyboardInterrupt reached main


def test_orderly_exit_reaps_the_watchdog(fast_impl, impl_kind):
    fast_impl("supervise")
    out = subprocess.run([PY, HELPER, "oneshot", impl_kind], env=_env(), check=True,
                         capture_output=True, timeout=30).stdout
    assert _wait_dead([int(out)], 1.0) == []
    assert _state(int(out)) is None  # reaped by its parent, not left as a zombie for init


def test_stopped_stage_gets_sigcont_with_sigterm(fast_impl):
    t0 = time.monotonic()
    r = fast_impl("supervise").run_supervised(["sh", "-c", "kill -STOP $$; sleep 30"],
                                              timeout_s=0.3, grace_s=5)
    assert r.timed_out and r.signal == signal.SIGTERM
    assert time.monotonic() - t0 < 2.0  # not the 5 s grace


def test_a_wedged_watchdog_does_not_hold_up_stages(fast_impl):
    # W sits out of the way: it neither spawns nor reports, so a stopped W costs nothing.
    mod = fast_impl("supervise")
    wd = _supervise_watchdog.ensure_started()
    os.kill(wd, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert mod.run_supervised(["true"]).ok
        r = mod.run_supervised(["sleep", "30"], timeout_s=0.2, grace_s=0.05)
        assert r.timed_out and time.monotonic() - t0 < 2
    finally:
        os.kill(wd, signal.SIGCONT)


def test_without_pidfds_polling_does_the_job(fast_impl, monkeypatch, tmp_path):
    mod = fast_impl("supervise")
    monkeypatch.setattr(_supervise_core, "USE_PIDFD", False)  # as on Linux < 5.3
    t0 = time.monotonic()
    out = Collect()
    r = mod.run_supervised(["sh", "-c", "echo hi; sleep 0.1; echo bye"], on_output=out)
    assert r.ok and out.data == b"hi\nbye\n"
    r = mod.run_supervised([PY, HELPER, "tree", str(tmp_path / "pids")], timeout_s=0.4,
                           grace_s=0.1)
    assert r.timed_out and time.monotonic() - t0 < 2.5
    assert [p for p in _read_pids(str(tmp_path / "pids")) if _alive(p)] == []


def test_a_dead_watchdog_is_replaced(fast_impl):
    mod = fast_impl("supervise")
    assert mod.run_supervised(["true"]).ok
    old = _supervise_watchdog.watchdog_pid()
    os.kill(old, signal.SIGKILL)
    _wait_dead([old], 2.0)
    assert mod.run_supervised(["true"]).ok
    assert _supervise_watchdog.watchdog_pid() not in (None, old)


def test_watchdog_death_mid_stage_leaves_the_stage_alone_and_w_is_replaced(fast_impl):
    mod = fast_impl("supervise")
    wd = _supervise_watchdog.ensure_started()
    threading.Timer(0.2, os.kill, (wd, signal.SIGKILL)).start()
    out = Collect()
    r = mod.run_supervised(["sh", "-c", "sleep 1.6; echo done"], on_output=out)
    assert r.ok and out.data == b"done\n"
    new = _supervise_watchdog.watchdog_pid()  # replaced while the stage ran (checked each second)
    assert new not in (None, wd) and _alive(new)


def test_stage_dies_with_a_sigkilled_supervisor_after_its_watchdog_was_replaced(
        fast_impl, impl_kind, tmp_path):
    fast_impl("supervise")
    pidfile, wdfile = str(tmp_path / "pids"), str(tmp_path / "wd")
    parent = subprocess.Popen([PY, HELPER, "supervisor", impl_kind, pidfile, wdfile],
                              env=_env(), stdin=subprocess.DEVNULL)
    try:
        pids = _read_pids(pidfile)
        old = _read_pids(wdfile)[0]
        os.kill(old, signal.SIGKILL)
        give_up = time.monotonic() + 5
        while not [p for p in _children(parent.pid) if p != old and _comm(p) == "heidi-watchdog"
                   and _alive(p)]:
            assert time.monotonic() < give_up, "no new watchdog"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_dead(pids, 2.0) == []


def test_an_escaped_daemon_without_the_token_dies_at_timeout(fast_impl, tmp_path):
    # C leaves the session, is re-parented, and drops its environment (no HEIDI_STAGE_TOKEN):
    # found as an orphan the supervisor adopted while this stage was its only one.
    pidfile = str(tmp_path / "pids")
    r = fast_impl("supervise").run_supervised([PY, HELPER, "tree", pidfile, "noenv"],
                                              timeout_s=0.5, grace_s=0.1)
    assert r.timed_out
    assert [p for p in _read_pids(pidfile) if _alive(p)] == []


def test_an_escaped_daemon_without_the_token_dies_with_a_sigkilled_supervisor(
        fast_impl, impl_kind, tmp_path):
    # The watchdog's snapshot of what heidi adopted is what finds C here.
    fast_impl("supervise")
    pidfile, wdfile = str(tmp_path / "pids"), str(tmp_path / "wd")
    parent = subprocess.Popen([PY, HELPER, "supervisor", impl_kind, pidfile, wdfile, "30",
                               "noenv"], env=_env(), stdin=subprocess.DEVNULL)
    try:
        pids = _read_pids(pidfile)
        time.sleep(1.6)  # W looks at heidi's adopted children twice a second: 3 looks
        assert all(_alive(p) for p in pids)
        assert b"HEIDI_STAGE_TOKEN" not in open(f"/proc/{pids[2]}/environ", "rb").read()
    finally:
        parent.kill()
        parent.wait()
    left = _wait_dead(pids, 2.0)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_watchdog_holds_none_of_heidis_files(fast_impl, tmp_path):
    fast_impl("supervise")
    _supervise_watchdog.shutdown()
    held = open(tmp_path / "lockfile", "w")  # e.g. heidi.lock, flock'd by heidi
    try:
        pid = _supervise_watchdog.ensure_started()
        time.sleep(0.05)
        targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(tmp_path / "lockfile") not in targets
        assert targets <= {"/dev/null"} | {t for t in targets if t.startswith(("pipe:", "socket:"))}
    finally:
        held.close()


# ---- StageLog ----------------------------------------------------------------------------------

def _red(text: str) -> str:
    return text.replace("SECRET123", "[X]")


def test_stagelog_redacts_tokens_split_across_chunks(tmp_path):
    path = tmp_path / "logs" / "deep" / "stage.log"
    log = StageLog(str(path), _red)
    for chunk in (b"a SEC", b"RET12", b"3 b\nsecond SECRET", b"123\nthird"):
        log.write(chunk)
    assert path.read_bytes() == b"a [X] b\nsecond [X]\n"
    log.close()
    assert path.read_bytes() == b"a [X] b\nsecond [X]\nthird"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    assert log.tail(9) == "[X]\nthird"
    log.close()  # idempotent
    with pytest.raises(ValueError):
        log.write(b"x")


def test_stagelog_appends(tmp_path):
    path = tmp_path / "stage.log"
    for word in (b"one\n", b"two\n"):
        with StageLog(str(path), _red) as log:
            log.write(word)
    assert path.read_bytes() == b"one\ntwo\n"


def test_stagelog_bounds_a_line_without_newline(tmp_path):
    path = tmp_path / "stage.log"
    log = StageLog(str(path), _red)
    text = "é" * 100_000  # 200 kB, no newline, 2-byte characters
    data = text.encode()
    for i in range(0, len(data), 7001):  # odd chunking splits characters
        log.write(data[i:i + 7001])
    assert len(log._partial) <= MAX_LINE_BYTES
    assert path.stat().st_size >= len(data) - MAX_LINE_BYTES
    log.close()
    assert path.read_bytes().decode() == text  # no character was cut in two


def test_stagelog_tail_is_bounded_and_invalid_utf8_replaced():
    log = StageLog(None, _red, tail_bytes=1000)
    for i in range(20_000):
        log.write(b"line %d \xff\n" % i)
    assert len("".join(log._tail)) < 1000 + 100
    assert log.tail(13) == "line 19999 \ufffd\n"
    assert log.tail(20) == "9998 \ufffd\nline 19999 \ufffd\n"


def test_stagelog_drops_private_key_blocks():
    log = StageLog(None, lambda s: s)
    log.write(b"before\n-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\n"
              b"MIIEowIBAAKCAQEAx7Z\nabc+/def=\n-----END RSA PRIVATE KEY-----\nafter\n"
              b"x -----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY----- y\n")
    log.close()
    assert log.tail(1000) == "before\n[PRIVATE_KEY]\nafter\nx [PRIVATE_KEY] y\n"


def test_stagelog_survives_a_full_disk():
    log = StageLog("/dev/full", _red)
    log.write(b"hello SECRET123\n")
    assert log.error and "No space left" in log.error
    log.write(b"more\n")
    assert log.tail(100) == "hello [X]\nmore\n"
    log.close()


def test_stagelog_memory_stays_bounded_for_200_mb(fast_impl, impl_kind, tmp_path):
    fast_impl("supervise")
    logpath = tmp_path / "big.log"
    out = subprocess.run([PY, HELPER, "memcheck", impl_kind, str(logpath), "200"], env=_env(),
                         check=True, capture_output=True, text=True, timeout=120).stdout.split()
    try:
        growth_kb, log_size, output_bytes, code, leaked = out
        assert int(output_bytes) == 200 * 1024 * 1024 and code == "0" and leaked == "False"
        assert int(log_size) == 200 * 1024 * 1024 - 256 * 200 * 3  # "SECRET" -> "[X]"
        assert int(growth_kb) < 50 * 1024
    finally:
        logpath.unlink(missing_ok=True)
