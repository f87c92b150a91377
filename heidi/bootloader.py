"""The one-file frozen heidi is a child of PyInstaller's bootloader, the process cron, systemd or
the user started. If the bootloader dies, even by SIGKILL, the kernel sends this process SIGTERM,
and heidi behaves as on any SIGTERM: the stage ends, the lock is released, the run is resumable.

A bootloader killed outright cannot delete the directory it unpacked heidi into ($TMPDIR/_MEI...,
tens of MB). So each one-file heidi marks its own directory as in use -- an exclusive flock on
`.heidi-alive` in it, held until this process and its watchdog are gone -- and removes the
directories of earlier one-file heidis, of the same user, whose mark nobody holds any more."""
from __future__ import annotations

import os
import signal
import sys
from stat import S_ISREG

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ALIVE_NAME = ".heidi-alive"
# The fd of this process's own mark (-1: none). Inherited by the stage watchdog, which keeps it
# open (see _supervise_watchdog): the directory stays while anything forked from heidi runs.
alive_fd = -1


def onefile_child() -> bool:
    """True in the one-file build's real heidi: frozen, and unpacked away from the executable
    (a one-folder build's files sit beside it, or in its _internal/)."""
    if not getattr(sys, "frozen", False):
        return False
    unpacked = getattr(sys, "_MEIPASS", None)
    if not unpacked:
        return False
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    real = os.path.realpath(unpacked)
    return not (real == exe_dir or real.startswith(exe_dir + os.sep))


def _runs_this_binary(pid: int) -> bool | None:
    """Whether pid runs the same executable as this process (None: cannot tell)."""
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(sys.executable)
    except OSError:
        return None


def die_with_bootloader() -> bool:
    """In the one-file build on Linux: ask for SIGTERM when the bootloader dies. True if set.

    The bootloader may already be gone before the request takes effect (then no signal would
    ever come): if the parent is no longer a process of this binary, act on SIGTERM at once."""
    if not sys.platform.startswith("linux") or not onefile_child():
        return False
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or _runs_this_binary(parent) is False:
        os.kill(os.getpid(), signal.SIGTERM)  # nothing is held yet: ends the process
    return True


def hold_unpacked(unpacked: str) -> int:
    """Mark `unpacked` as in use for the life of this process: `.heidi-alive` in it, exclusively
    flocked. The file appears already locked (made under another name, locked, then renamed), so
    a sweeper never sees it unheld while this process lives. Returns the fd (close-on-exec)."""
    global alive_fd
    import fcntl
    if alive_fd >= 0:
        return alive_fd
    temp = os.path.join(unpacked, f"{ALIVE_NAME}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(temp, os.path.join(unpacked, ALIVE_NAME))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    alive_fd = fd
    return fd


def sweep_unpacked(parent: str, own: str | None = None) -> list[str]:
    """Remove the directories `_MEI*` in `parent` that a one-file heidi of this user unpacked and
    no live process marks any more (its bootloader was killed outright). A directory without
    heidi's mark (another PyInstaller program, or an older heidi that may still run from it), a
    symlink, or one of another user is left alone. Returns the paths removed; never raises."""
    import fcntl
    import shutil
    removed: list[str] = []
    uid = os.geteuid()
    own_real = os.path.realpath(own) if own is not None else None
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith("_MEI")]
    except OSError:
        return removed
    for entry in entries:
        path = entry.path
        if own_real is not None and os.path.realpath(path) == own_real:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != uid:
                continue
            fd = os.open(os.path.join(path, ALIVE_NAME),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # no mark (or gone already): not ours to judge
        try:
            mark = os.fstat(fd)
            if not S_ISREG(mark.st_mode) or mark.st_uid != uid:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a heidi (or its watchdog) still runs from there
            # Held by this sweep until the directory is gone: a second sweeper skips it.
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def tidy_unpacked() -> None:
    """In the one-file build: mark this heidi's directory in use, then sweep the directories
    earlier one-file heidis left behind. Failures are ignored: tidying never stops a command."""
    if not onefile_child():
        return
    unpacked = os.path.realpath(getattr(sys, "_MEIPASS", ""))
    try:
        hold_unpacked(unpacked)
    except OSError:
        pass  # left unmarked: only never swept by a later heidi, the bootloader still removes it
    sweep_unpacked(os.path.dirname(unpacked), unpacked)
