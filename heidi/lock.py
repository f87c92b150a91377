"""The run lock: whoever advances a run holds a flock on OUT_DIR/heidi.lock for the whole tick."""
from __future__ import annotations

import errno
import fcntl
import os
import time

from .errors import RunLocked

# Where /proc/locks is unreadable, lock_holder() tests the lock by taking a shared flock for a few
# microseconds; a non-blocking acquire that meets such a probe tries again after these pauses, so a
# status probe never makes a tick exit 75 or a stop get queued with nobody to apply it.
_PROBE_RETRY_DELAYS_S = (0.0005, 0.001, 0.002)


def _pid_record(pid: int) -> bytes:
    # 10 digits hold any pid (pid_max <= 2**22), so a shorter pid overwrites a longer one whole.
    return b"%-10d\n" % pid


def _named(exc: OSError, path: str) -> OSError:
    """exc naming the lock file (flock, pread and pwrite name none)."""
    return exc if exc.filename is not None else OSError(exc.errno, exc.strerror, path)


class RunLock:
    """An exclusive, non-inheritable flock; released by the kernel if the holder dies.

    release(keep=True) unlocks but keeps the file open for the next acquire (a process that
    takes the run tick after tick: flock only, no open/close); whoever keeps it re-takes the
    lock on a fresh open when the run's files changed meanwhile (`retake`).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._kept = -1  # unlocked, open, for the next acquire in this process
        self._pid = 0
        self.reused = False  # the last acquire locked a kept file (see retake)

    def acquire(self, blocking: bool = False) -> "RunLock":
        fd, self._kept = self._kept, -1
        pid = os.getpid()
        if fd >= 0 and pid != self._pid:
            # a forked child's copy shares its parent's open file, and so its flock: drop it
            # (closing a copy never releases the parent's lock)
            os.close(fd)
            fd = -1
        self.reused = fd >= 0
        if fd < 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._take(fd, blocking, pid)
        return self

    def _take(self, fd: int, blocking: bool, pid: int) -> None:
        """flock fd (closed on failure) and make the file name pid."""
        try:
            if blocking:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                for delay_s in _PROBE_RETRY_DELAYS_S + (None,):
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if delay_s is None:
                            raise
                        time.sleep(delay_s)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{self.path}: another heidi process holds this run") from None
        except OSError as exc:
            os.close(fd)
            raise _named(exc, self.path) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for people and for lock_holder() where /proc/locks is unreadable; the
        # flock is what counts. Written at a fixed width (no ftruncate, ~0.35 ms on ext4) and only
        # when the file does not already name this process (a long-lived holder writes it once).
        # On a full disk a new lock file cannot take its record (ENOSPC): the lock is held all the
        # same, and the holder is still found in /proc/locks ("held by an unknown pid" where that
        # is unreadable), so a `heidi run` or daemon taking a new run goes on to wait for space.
        record = _pid_record(pid)
        try:
            if os.pread(fd, len(record) + 1, 0) != record:
                os.pwrite(fd, record, 0)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise _named(exc, self.path) from None
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        self._fd, self._pid = fd, pid

    def retake(self) -> None:
        """Held on a file kept open: make sure it is the file the path names now (someone may
        have deleted or replaced it, OUT_DIR and all); if not, lock the new one instead."""
        if self._fd < 0:
            return
        try:
            fresh = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            self.release()
            raise
        held, now = os.fstat(self._fd), os.fstat(fresh)
        if (held.st_ino, held.st_dev) == (now.st_ino, now.st_dev):
            os.close(fresh)
            return
        self.release()
        self._take(fresh, False, os.getpid())

    def fileno(self) -> int:
        """The locked descriptor (-1 when not held): a child that inherits it keeps the run
        locked until it exits (sbatch, while a Slurm job is being submitted)."""
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self, keep: bool = False) -> None:
        """Unlock; keep=True keeps the file open for the next acquire of this process."""
        if self._kept >= 0:
            fd, self._kept = self._kept, -1
            os.close(fd)
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BaseException:
                os.close(fd)
                raise
            if keep:
                self._kept = fd
            else:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # dropped while keeping an unlocked fd: it must not leak (a held lock stays held, as
        # before: whoever drops a RunLock while holding it means to keep the run)
        fd = getattr(self, "_kept", -1)
        if fd >= 0:
            self._kept = -1
            os.close(fd)


def lock_holder(path: str) -> int | None:
    """Pid of the process holding the lock, or None when it is free.

    Read from /proc/locks, so that asking never touches the lock itself (a probe that took it
    even for a microsecond could make a tick starting at that instant exit 75); where
    /proc/locks cannot be read, a brief shared flock answers instead.
    """
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return None
    try:
        with open("/proc/locks", "rb") as fh:
            table = fh.read()
    except OSError:
        return _probe_holder(path)
    suffix = b":%d" % inode
    for line in table.splitlines():
        # "3: FLOCK  ADVISORY  WRITE 4242 fd:01:131090 0 EOF"; waiters read "3: -> FLOCK ..."
        fields = line.split()
        if (len(fields) >= 6 and fields[1] == b"FLOCK" and fields[3] == b"WRITE"
                and fields[5].endswith(suffix) and fields[5].count(b":") == 2):
            return int(fields[4]) if fields[4].lstrip(b"-").isdigit() else -1
    return None


def _probe_holder(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.pread(fd, 32, 0).strip()
            return int(data) if data.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
