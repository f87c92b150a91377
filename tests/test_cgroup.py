"""Stage cgroups (cgroup v2): a stage whose grandchild double-forks, setsid()s and clears its
environment does not survive heidi's SIGKILL, a timeout or a stop; the stage's cgroup is removed
afterwards; its CPU is counted from cpu.stat; and where cgroups are off, heidi says so."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

from heidi._fast import _supervise_cgroup as cg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers_children.py")
PY = sys.executable


def _available() -> cg.Containment:
    cg.reset()
    return cg.containment()


def _skip_without_cgroups() -> cg.Containment:
    where = _available()
    if where.kind != "cgroup":
        pytest.skip(f"no stage cgroups here: {where.reason}")
    return where


@pytest.fixture(autouse=True)
def fresh_decision(monkeypatch):
    monkeypatch.delenv(cg.ENV, raising=False)
    cg.reset()
    yield
    cg.reset()


def _marked(marker: str) -> list[int]:
    """Live processes with marker in their argv."""
    needle = marker.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        if needle in cmdline and stat[stat.rfind(b")") + 2:][:1] != b"Z":
            found.append(int(name))
    return found


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _none_left(marker: str, within_s: float) -> list[int]:
    give_up = time.monotonic() + within_s
    while True:
        left = _marked(marker)
        if not left or time.monotonic() >= give_up:
            return left
        time.sleep(0.02)


def _stage_dirs(parent: str) -> set[str]:
    """This process's stage cgroups (other test runs on the machine may have theirs beside)."""
    from heidi._fast import _supervise_core
    own = cg.PREFIX + _supervise_core._new_token()[:-8]  # the token prefix of this process
    return {n for n in os.listdir(parent) if n.startswith(own)}


# ---- finding the hierarchy -----------------------------------------------------------------------

def test_find_mount_reads_the_cgroup2_line_and_unescapes_it():
    text = ("24 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
            "31 24 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
            "41 24 0:38 / /srv/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n")
    assert cg.find_mount(text) == "/srv/my cgroups"
    assert cg.find_mount("24 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n") is None


def test_own_cgroup_is_the_v2_path_of_this_process():
    path = cg.own_cgroup()
    with open("/proc/self/cgroup") as fh:
        lines = [line.rstrip("\n")[3:] for line in fh if line.startswith("0::")]
    assert path == (lines[0] if lines else None)


def test_heidi_cgroup_0_turns_cgroups_off(monkeypatch):
    monkeypatch.setenv(cg.ENV, "0")
    where = cg.containment()
    assert where.kind == "process" and where.parent is None
    assert where.describe() == "process groups + subreaper (HEIDI_CGROUP=0)"


def test_no_cgroup2_mount_means_process_containment(monkeypatch):
    monkeypatch.setattr(cg, "find_mount", lambda mountinfo=None: None)
    where = cg.containment()
    assert (where.kind, where.reason) == ("process", "no cgroup2 mount")


def test_a_directory_that_is_no_cgroup_is_refused(monkeypatch, tmp_path):
    # A plain directory accepts the probe's mkdir but has no cgroup.procs to write.
    monkeypatch.setattr(cg, "find_mount", lambda mountinfo=None: str(tmp_path))
    monkeypatch.setattr(cg, "own_cgroup", lambda pid="self": "/")
    where = cg.containment()
    assert where.kind == "process"
    assert "cgroup.procs is not writable" in where.reason
    assert os.listdir(tmp_path) == []  # the probe is removed


def test_the_decision_names_the_cgroup_it_uses():
    where = _skip_without_cgroups()
    mount = cg.find_mount()
    assert where.parent == os.path.normpath(mount + cg.own_cgroup())
    assert where.describe() == f"cgroup v2 at {where.parent}"


# ---- the stage's end ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["timeout", "stop"])
def test_timeout_and_stop_kill_an_escaped_env_less_grandchild(fast_impl, how):
    where = _skip_without_cgroups()
    mod = fast_impl("supervise")
    marker = f"heidi-escapee-{uuid.uuid4().hex}"
    before = _stage_dirs(where.parent)
    seen = []

    def on_output(chunk: bytes) -> None:
        seen.append(chunk)

    def should_stop() -> bool:
        return b"escaped" in b"".join(seen) and bool(_marked(marker))

    try:
        kwargs = {"timeout_s": 3.0} if how == "timeout" else {"should_stop": should_stop,
                                                                  "check_interval_s": 0.05}
        result = mod.run_supervised([PY, HELPER, "escape", marker], grace_s=0.3,
                                    on_output=on_output, **kwargs)
        assert b"escaped" in b"".join(seen)
        assert (result.timed_out if how == "timeout" else result.stopped)
        left = _marked(marker)  # at once: the stage is over only when its cgroup is empty
        assert left == []
        assert _stage_dirs(where.parent) == before
    finally:
        _kill_all(_marked(marker))


def test_a_stage_that_ends_by_itself_takes_its_escapee_and_its_cgroup(fast_impl):
    where = _skip_without_cgroups()
    mod = fast_impl("supervise")
    marker = f"heidi-escapee-{uuid.uuid4().hex}"
    before = _stage_dirs(where.parent)
    try:
        result = mod.run_supervised([PY, HELPER, "escape", marker, "0", "0.3"], timeout_s=30,
                                    grace_s=0.3)
        assert result.exit_code == 0 and not result.timed_out
        assert _marked(marker) == []
        assert _stage_dirs(where.parent) == before
    finally:
        _kill_all(_marked(marker))


def test_usage_counts_the_cpu_of_a_grandchild_the_main_never_waited_for(fast_impl):
    _skip_without_cgroups()
    mod = fast_impl("supervise")
    marker = f"heidi-busy-{uuid.uuid4().hex}"
    try:
        # The grandchild burns 0.5 s of CPU and exits; the main process sleeps through it and
        # never waits for it (it was reparented), so its rusage holds none of that CPU.
        result = mod.run_supervised([PY, HELPER, "escape", marker, "0.5", "1.5"], timeout_s=30)
        assert result.exit_code == 0
        assert result.cpu_source == "cgroup"
        assert result.cpu_user_s + result.cpu_sys_s >= 0.45
        where = cg.containment()
        assert result.memory_source == ("cgroup" if where.memory else "rusage")
    finally:
        _kill_all(_marked(marker))


def test_without_cgroups_usage_is_rusage_and_no_cgroup_is_made(fast_impl, monkeypatch):
    mod = fast_impl("supervise")
    monkeypatch.setenv(cg.ENV, "0")
    where = cg.StageCgroup  # (the class must not be used at all)
    made = []
    monkeypatch.setattr(where, "create", classmethod(lambda cls, *a: made.append(a)))
    result = mod.run_supervised(["/bin/true"])
    assert result.ok and made == []
    assert (result.cpu_source, result.memory_source) == ("rusage", "rusage")


def test_a_stage_refused_its_cgroup_runs_without_one(fast_impl, monkeypatch):
    # Entering the cgroup fails (as it does without write access to cgroup.procs): the stage
    # still runs, heidi says which containment it fell back to.
    _skip_without_cgroups()
    mod = fast_impl("supervise")
    real_create = cg.StageCgroup.create.__func__

    def create(cls, where, token):
        stage_cg = real_create(cls, where, token)
        if stage_cg is not None:
            os.close(stage_cg.procs_fd)
            stage_cg.procs_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # write fails
        return stage_cg

    monkeypatch.setattr(cg.StageCgroup, "create", classmethod(create))
    out = []
    result = mod.run_supervised(["sh", "-c", "echo ok"], on_output=out.append)
    assert result.ok and b"".join(out) == b"ok\n"
    assert result.cpu_source == "rusage"
    assert cg.containment().kind == "process"
    assert "cannot move a process into a cgroup" in cg.containment().reason


# ---- heidi SIGKILLed -----------------------------------------------------------------------------

def _one_kill(impl: str, where: cg.Containment, rng: random.Random) -> tuple[list[int], bool]:
    """Start a heidi stand-in, SIGKILL it 50-300 ms into its stage; (survivors, cgroup gone)."""
    marker = f"heidi-escapee-{uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(cg.ENV, None)
    proc = subprocess.Popen([PY, HELPER, "escsupervisor", impl, marker], env=env,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    path = None
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("started "), f"the stand-in's stage did not start: {line!r}"
        path = cg.stage_path(where.parent, line.split()[1])
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        left = _none_left(marker, 5.0)
        give_up = time.monotonic() + 5.0
        while os.path.exists(path) and time.monotonic() < give_up:
            time.sleep(0.02)
        return left, not os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        _kill_all(_marked(marker))


def test_sigkill_of_heidi_50_to_300_ms_into_a_stage_leaves_no_survivor_in_20_tries(impl_kind):
    if impl_kind == "c":
        pytest.importorskip("heidi._fast._supervise_c")
    where = _skip_without_cgroups()
    rng = random.Random(9)
    for attempt in range(20):
        left, gone = _one_kill(impl_kind, where, rng)
        assert left == [], f"try {attempt + 1}: survivors {left}"
        assert gone, f"try {attempt + 1}: the stage's cgroup was not removed"


# ---- what heidi says ---------------------------------------------------------------------------

def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=ROOT, **env)
    if cg.ENV not in env:
        full.pop(cg.ENV, None)
    return subprocess.run([PY, "-m", "heidi", *args], env=full, capture_output=True, text=True, check=False,
                          timeout=60)


@pytest.mark.parametrize("setting", ["0", ""])
def test_version_verbose_and_status_name_the_containment(tmp_path, setting):
    expected = ("process groups + subreaper (HEIDI_CGROUP=0)" if setting == "0"
                else _available().describe())
    env = {cg.ENV: setting} if setting else {}
    proc = _cli("version", "--verbose", **env)
    assert proc.returncode == 0
    assert f"containment: {expected}\n" in proc.stdout
    out_dir = str(tmp_path / "run")
    proc = _cli("status", OUT_DIR=out_dir, **env)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    assert proc.stdout.endswith(f"; containment: {expected}\n")
    proc = _cli("status", "--json", OUT_DIR=out_dir, **env)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["containment"] == expected


def test_status_names_the_cgroup_of_the_holders_running_stage(tmp_path):
    where = _skip_without_cgroups()
    marker = f"heidi-escapee-{uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(cg.ENV, None)
    proc = subprocess.Popen([PY, HELPER, "escsupervisor", "py", marker], env=env,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().startswith(b"started ")
        cg.disable("as a status process elsewhere would see it")
        assert cg.running_containment(proc.pid) == where.describe()
        assert cg.running_containment(None) == "process groups + subreaper " \
            "(as a status process elsewhere would see it)"
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdout.close()
        assert _none_left(marker, 5.0) == []
