"""Stage supervision, pure-Python twin of `_supervise_c`: run one stage to its end, streaming its
output to a callback, with a timeout, a stop check, and SIGTERM → grace → SIGKILL of everything
the stage started. The stage's lifecycle is `_supervise_core.Stage`; this twin spawns with
subprocess and waits with select.poll.
"""
from __future__ import annotations

import errno
import math
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from . import _supervise_core as _core
from ._supervise_types import StageResult
from ._supervise_watchdog import SIGNALS_TO_DEFAULT

__all__ = ("StageResult", "run_supervised", "COMPILED")

COMPILED = False
# Bytes asked of one read(): the output pipe of a chatty stage holds 1 MiB. Read into one
# reused buffer and copied out: os.read(fd, 1 MiB) would allocate (and page-fault) a fresh
# megabyte per chunk, which halves the throughput.
READ_SIZE = 1 << 20
MAX_WAIT_MS = 1000


# A stage starts with every signal at its default and none blocked, as with the compiled twin
# (posix_spawn's SETSIGDEF + SETSIGMASK). Popen(restore_signals=True) resets only these (CPython
# ignores them itself); other ignored signals (SIGHUP under nohup, SIGINT for `cmd &` in a
# script) and the calling thread's mask would pass to the stage as they are.
_ALL = sum(1 << (sig - 1) for sig in SIGNALS_TO_DEFAULT)
_RESET_BY_POPEN = sum(1 << (sig - 1) for sig in (signal.SIGPIPE, signal.SIGXFSZ))


def _popen_gives_default_signals() -> bool:
    """True when nothing is ignored but what Popen resets, and this thread blocks nothing
    (SigIgn is the process's, SigBlk this thread's)."""
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/status",
                     os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 16384)
        finally:
            os.close(fd)
        blocked = _field(status, b"\nSigBlk:")
        ignored = _field(status, b"\nSigIgn:")
    except (OSError, ValueError):
        return False
    return blocked & _ALL == 0 and ignored & _ALL & ~_RESET_BY_POPEN == 0


def _field(status: bytes, name: bytes) -> int:
    start = status.index(name) + len(name)
    return int(status[start:status.index(b"\n", start)], 16)


def _spawn(path: bytes, argv: list, env: dict, cwd: bytes | None, out_w: int) -> int:
    if not _popen_gives_default_signals():
        # ENOSYS: Stage.start then takes the fork path, which resets every disposition and the
        # mask in the child (slower, and only when heidi itself runs with signals ignored).
        raise OSError(errno.ENOSYS, "Popen cannot reset signal dispositions")
    # subprocess gives what os.posix_spawn cannot: a working directory, and every fd above 2
    # closed (close_fds) -- in the child, without forking this process's memory (vfork).
    proc = subprocess.Popen(argv, executable=path, stdin=subprocess.DEVNULL, stdout=out_w,
                            stderr=out_w, env=env, cwd=cwd, close_fds=True,
                            start_new_session=True, restore_signals=True)
    # The stage's supervisor reaps it (os.wait4, for its rusage), never this object: marked
    # done, it neither warns when collected nor waits on a pid that is no longer its own.
    proc.returncode = 0
    return proc.pid


def run_supervised(argv: Sequence[str], *, cwd: str | None = None,
                   env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                   grace_s: float = 5.0, on_output: Callable[[bytes], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, check_interval_s: float = 0.25,
                   rlimits: Mapping[int, tuple[int, int]] | None = None) -> StageResult:
    """Run argv as a stage and wait for it; see `heidi._fast.supervise` for the contract."""
    _core.check_args(timeout_s, grace_s, check_interval_s)
    stage = _core.Stage(argv, cwd, env, rlimits, grace_s)
    stage.start(_spawn)
    if stage.error is not None:
        return stage.result(False, timeout_s, False, 0)
    out_fd = stage.out_fd
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    watched = stage.pidfd
    if watched >= 0:
        poller.register(watched, select.POLLIN)
    deadline = stage.t0 + timeout_s if timeout_s is not None else math.inf
    next_check = stage.t0 + check_interval_s if should_stop is not None else math.inf
    out_open = True
    timed_out = stopped = False
    drain_until = math.inf
    # Sized like the pipe: 64 KiB, 1 MiB once a chatty stage got the bigger pipe.
    buf = bytearray(_core.PIPE_DEFAULT_SIZE)
    view = memoryview(buf)
    total = 0
    grown = False
    try:
        while True:
            now = time.monotonic()
            if stage.finished:
                # Nothing of the stage is left: read what is still in the pipe, bounded in case
                # a writer escaped.
                if not out_open:
                    break
                if drain_until == math.inf:
                    drain_until = now + _core.DRAIN_S
                elif now >= drain_until:
                    break
                wake = drain_until
            else:
                wake = stage.wake_at
                if stage.live:
                    wake = min(wake, deadline, next_check)
            if watched != stage.pidfd:
                if watched >= 0:
                    poller.unregister(watched)  # closed by the reap
                watched = stage.pidfd
                if watched >= 0:
                    poller.register(watched, select.POLLIN)
            # Capped, like the compiled twin: a signal landing just before poll() is seen soon.
            wait_ms = (wake - now) * 1000
            timeout_ms = MAX_WAIT_MS if wait_ms >= MAX_WAIT_MS else max(0, math.ceil(wait_ms))
            pid_ready = eof = False
            for fd, events in poller.poll(timeout_ms):
                if fd != out_fd or not out_open:  # (the pidfd may reuse a closed out_fd's number)
                    pid_ready = True
                elif events & select.POLLIN:
                    size = os.readv(out_fd, (buf,))
                    if size:
                        total += size
                        if on_output is not None:
                            on_output(bytes(view[:size]))
                        if not grown and size >= _core.PIPE_DEFAULT_SIZE:
                            _core.grow_pipe(out_fd)
                            grown = True
                            buf = bytearray(READ_SIZE)
                            view = memoryview(buf)
                    else:
                        eof = True
                else:
                    eof = True  # POLLHUP alone: every writer is gone, nothing left to read
            if eof:
                poller.unregister(out_fd)
                stage.close_output()
                out_open = False
            if stage.finished:
                continue
            now = time.monotonic()
            if pid_ready or eof or now >= stage.wake_at:
                stage.on_wake(now)
            if not stage.live:
                continue
            if now >= deadline:
                timed_out = True
                stage.terminate(now)
            elif now >= next_check and should_stop is not None:  # (next_check is inf without it)
                next_check = now + check_interval_s
                if should_stop():
                    stopped = True
                    stage.terminate(now)
    except BaseException:
        # A callback (or ^C) interrupts us: the stage must not outlive this call.
        stage.abort()
        raise
    finally:
        stage.close()
    return stage.result(timed_out, timeout_s, stopped, total)
