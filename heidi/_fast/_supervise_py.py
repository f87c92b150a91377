"""Stage supervision, pure-Python twin of `_supervise_c`: run one stage to its end, streaming its
output to a callback, with a timeout, a stop check, and SIGTERM → grace → SIGKILL of everything
the stage started. Spawning and killing are done by the watchdog in `_supervise_watchdog`.
"""
from __future__ import annotations

import math
import os
import select
import time
from collections.abc import Callable, Mapping, Sequence

from . import _supervise_watchdog as _wd
from ._supervise_types import StageResult

__all__ = ("StageResult", "run_supervised", "COMPILED")

COMPILED = False
# Bytes asked of one read(): the output pipe of a chatty stage holds 1 MiB. Read into one
# reused buffer and copied out: os.read(fd, 1 MiB) would allocate (and page-fault) a fresh
# megabyte per chunk, which halves the throughput.
READ_SIZE = 1 << 20
MAX_WAIT_MS = 1000


def run_supervised(argv: Sequence[str], *, cwd: str | None = None,
                   env: Mapping[str, str] | None = None, timeout_s: float | None = None,
                   grace_s: float = 5.0, on_output: Callable[[bytes], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, check_interval_s: float = 0.25,
                   rlimits: Mapping[int, tuple[int, int]] | None = None) -> StageResult:
    """Run argv as a stage and wait for it; see `heidi._fast.supervise` for the contract."""
    _wd.check_args(timeout_s, grace_s, check_interval_s)
    launch = _wd.launch(argv, cwd, env, rlimits, grace_s)
    reader = _wd.StatusReader()
    if launch.error is not None:
        return _wd.build_result(launch, reader, timed_out=False, timeout_s=timeout_s,
                                stopped=False, output_bytes=0)
    out_fd, st_fd = launch.out_fd, launch.status_fd
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    poller.register(st_fd, select.POLLIN)
    deadline = launch.t0 + timeout_s if timeout_s is not None else math.inf
    next_check = launch.t0 + check_interval_s if should_stop is not None else math.inf
    out_open = st_open = True
    ending = timed_out = stopped = False
    drain_until = w_deadline = math.inf
    # Sized like the pipe: 64 KiB, 1 MiB once a chatty stage got the bigger pipe.
    buf = bytearray(_wd.PIPE_DEFAULT_SIZE)
    view = memoryview(buf)
    total = 0
    grown = False
    try:
        while out_open and (st_open or reader.final is not None):
            now = time.monotonic()
            if reader.final is not None:
                # The stage is over (W reports only when none of its processes is left): read
                # what is still in the pipe, bounded in case a writer escaped.
                if drain_until == math.inf:
                    drain_until = now + _wd.DRAIN_S
                elif now >= drain_until:
                    break
                wake = drain_until
            else:
                wake = w_deadline if ending else min(deadline, next_check)
            # Capped, like the compiled twin: a signal landing just before poll() is seen soon.
            wait_ms = (wake - now) * 1000
            timeout_ms = MAX_WAIT_MS if wait_ms >= MAX_WAIT_MS else max(0, math.ceil(wait_ms))
            for fd, _ in poller.poll(timeout_ms):
                if fd == out_fd:
                    size = os.readv(out_fd, (buf,))
                    if size:
                        total += size
                        if on_output is not None:
                            on_output(bytes(view[:size]))
                        if not grown and size >= _wd.PIPE_DEFAULT_SIZE:
                            _wd.grow_pipe(out_fd)
                            grown = True
                            buf = bytearray(READ_SIZE)
                            view = memoryview(buf)
                    else:
                        poller.unregister(out_fd)
                        out_open = False
                else:
                    data = os.read(st_fd, 4096)
                    if data:
                        reader.feed(data)
                    else:
                        poller.unregister(st_fd)
                        st_open = False
            if reader.final is not None or not st_open:
                continue
            now = time.monotonic()
            if ending:
                if now >= w_deadline:  # W should have reported long ago
                    _wd.kill_watchdog()
                    w_deadline = math.inf
                continue
            if now >= deadline:
                timed_out = ending = True
            elif now >= next_check:
                next_check = now + check_interval_s
                stopped = ending = bool(should_stop())
            if ending:
                _wd.request_term(launch.sid)
                w_deadline = now + grace_s + _wd.W_SILENT_S
        if reader.final is None and st_open:
            reader.settle(st_fd)
    except BaseException:
        # A callback (or ^C) interrupts us: the stage must not outlive this call.
        _wd.abort(launch, reader, st_open, grace_s)
        raise
    finally:
        launch.close()
    return _wd.build_result(launch, reader, timed_out=timed_out, timeout_s=timeout_s,
                            stopped=stopped, output_bytes=total)
