"""The one-file build's unpacked directories: each heidi marks its own as in use (.heidi-alive,
flocked), and removes those earlier one-file heidis of the same user left behind when their
bootloader was killed outright. The frozen binary's own test (tests/test_frozen.py) kills a
bootloader and checks the next tick removes what it left; these check the rules without a build."""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

from heidi import bootloader
from heidi.bootloader import ALIVE_NAME, hold_unpacked, sweep_unpacked, tidy_unpacked

from cli_helpers import clean_env


@pytest.fixture(autouse=True)
def no_mark_of_our_own(monkeypatch):
    monkeypatch.setattr(bootloader, "alive_fd", -1)
    yield
    if bootloader.alive_fd >= 0:
        os.close(bootloader.alive_fd)


def _unpacked(parent, name: str, marked: bool = True):
    path = parent / name
    (path / "heidi").mkdir(parents=True)
    (path / "heidi" / "__init__.pyc").write_bytes(b"x" * 100)
    (path / "libpython3.11.so.1.0").write_bytes(b"y" * 100)
    if marked:
        (path / ALIVE_NAME).write_bytes(b"")
    return path


def _held_elsewhere(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return True
    finally:
        os.close(fd)
    return False


def _gone(pid: int, within_s: float) -> bool:
    """pid exited (reaped here if this process became its parent, as a child subreaper would)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_mark_is_held_from_the_moment_it_appears(tmp_path):
    own = _unpacked(tmp_path, "_MEI00001234abcdef", marked=False)
    fd = hold_unpacked(str(own))
    assert fd == bootloader.alive_fd and hold_unpacked(str(own)) == fd  # once per process
    assert sorted(os.listdir(own)) == sorted([ALIVE_NAME, "heidi", "libpython3.11.so.1.0"])
    assert _held_elsewhere(own / ALIVE_NAME)
    assert os.get_inheritable(fd) is False  # a stage never inherits it
    assert sweep_unpacked(str(tmp_path)) == [] and own.is_dir()


def test_only_unmarked_or_unheld_directories_of_this_user_go(tmp_path):
    parent = tmp_path / "tmp"
    parent.mkdir()
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    stale = _unpacked(parent, "_MEI00000101aaaaaa")
    os.symlink(outside, stale / "link-out")  # removed as a link, never followed
    stale2 = _unpacked(parent, "_MEI00000102bbbbbb")
    held = _unpacked(parent, "_MEI00000103cccccc")
    unmarked = _unpacked(parent, "_MEI00000104dddddd", marked=False)  # another program, an old heidi
    elsewhere = _unpacked(tmp_path, "_MEI00000105eeeeee")
    os.symlink(elsewhere, parent / "_MEI00000106ffffff")
    mark_link = _unpacked(parent, "_MEI00000107gggggg", marked=False)
    os.symlink(outside, mark_link / ALIVE_NAME)
    own = _unpacked(parent, "_MEI00000108hhhhhh")
    not_mei = _unpacked(parent, "heidi-cache")
    kept = [held, unmarked, elsewhere, parent / "_MEI00000106ffffff", mark_link, own, not_mei]
    if os.geteuid() == 0:
        foreign = _unpacked(parent, "_MEI00000109iiiiii")
        for root, dirs, files in os.walk(foreign):
            for name in dirs + files:
                os.chown(os.path.join(root, name), 4242, 4242)
        os.chown(foreign, 4242, 4242)
        kept.append(foreign)
    holder = os.open(held / ALIVE_NAME, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        removed = sweep_unpacked(str(parent), str(own))
        assert sorted(removed) == sorted([str(stale), str(stale2)])
        assert all(os.path.lexists(path) for path in kept)
        assert outside.read_bytes() == b"keep me"
        assert (held / "heidi" / "__init__.pyc").exists()
    finally:
        os.close(holder)
    # once its holder is gone, the held one goes too
    assert sweep_unpacked(str(parent), str(own)) == [str(held)]


def test_a_sweep_of_a_missing_or_unreadable_parent_is_quiet(tmp_path):
    assert sweep_unpacked(str(tmp_path / "nowhere")) == []
    (tmp_path / "file").write_bytes(b"")
    assert sweep_unpacked(str(tmp_path / "file")) == []


def test_tidy_marks_this_heidi_and_sweeps_its_siblings(tmp_path, monkeypatch):
    parent = tmp_path / "tmp"
    parent.mkdir()
    own = _unpacked(parent, "_MEI00000201abcdef", marked=False)
    stale = _unpacked(parent, "_MEI00000202abcdef")
    (tmp_path / "bin").mkdir()
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(own), raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "heidi"))
    tidy_unpacked()
    assert not stale.exists() and own.is_dir()
    assert _held_elsewhere(own / ALIVE_NAME)


def test_not_frozen_nothing_is_touched(tmp_path, monkeypatch):
    stale = _unpacked(tmp_path, "_MEI00000301abcdef")
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path / "_MEI00000302abcdef"), raising=False)
    monkeypatch.delattr(sys, "frozen", raising=False)
    tidy_unpacked()
    assert stale.exists() and bootloader.alive_fd == -1


def test_the_watchdog_keeps_the_mark_while_heidi_is_gone(tmp_path):
    """W outlives a SIGKILLed heidi for a moment (it kills the stages): the directory it runs
    from must not be swept from under it. Once W is gone too, the next sweep removes it."""
    parent = tmp_path / "tmp"
    parent.mkdir()
    unpacked = _unpacked(parent, "_MEI00000401abcdef", marked=False)
    script = (
        "import sys, time\n"
        "from heidi import bootloader\n"
        "from heidi._fast import _supervise_watchdog as w\n"
        "bootloader.hold_unpacked(sys.argv[1])\n"
        "w.ensure_started()\n"
        "print(w.watchdog_pid(), flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(unpacked)], env=clean_env(),
                            stdout=subprocess.PIPE)
    try:
        watchdog = int(proc.stdout.readline())
        end = time.monotonic() + 10
        while open(f"/proc/{watchdog}/comm").read() != "heidi-watchdog\n":  # set up: named last
            assert time.monotonic() < end
            time.sleep(0.01)
        mark = str(unpacked / ALIVE_NAME)
        held_by = [os.readlink(f"/proc/{watchdog}/fd/{fd}") for fd in os.listdir(f"/proc/{watchdog}/fd")]
        assert sorted(held_by)[:3] == ["/dev/null"] * 3 and mark in held_by, held_by
        assert len(held_by) == 5, held_by  # besides 0-2 and the mark: only the lifeline
        os.kill(watchdog, 19)  # SIGSTOP: W lingers as it would while it kills a stage
        proc.kill()
        proc.wait()
        assert sweep_unpacked(str(parent)) == [] and unpacked.is_dir()
        os.kill(watchdog, 18)  # SIGCONT: W sees heidi gone and exits
        assert _gone(watchdog, 10.0)
        assert sweep_unpacked(str(parent)) == [str(unpacked)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
