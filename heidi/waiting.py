"""A full disk is a wait, not a crash: which I/O errors are waits (ENOSPC, EDQUOT), the room a
transition needs before it starts, and DiskWait, the retry with backoff that the daemon and
`heidi run` put around their writes while status says what they wait for.
"""
from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable, TypeVar

from .clock import Clock, clock_from_env
from .interrupt import Interrupt

T = TypeVar("T")

# ENOSPC and EDQUOT pass once someone frees space; anything else (EIO, EROFS, ...) is not a wait.
WAIT_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT))
# Below this much free space a transition is not begun: a journal line, state.json and a stage's
# first output must fit, and a stage started on a full disk would fail the run for nothing.
MIN_FREE_BYTES = 64 * 1024
FIRST_RETRY_S = 2.0
MAX_RETRY_S = 30.0
_POLL_S = 0.25  # how often a wait looks at the interrupt (a signal ends it within this)


def stderr_line(line: str) -> None:
    """A DiskWait's log for the CLI: one line on stderr ("heidi: ..."), whatever becomes of it."""
    try:
        print(f"heidi: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr gone (a closed pipe, a full disk under a log file): the wait goes on


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WAIT_ERRNOS


def with_path(exc: OSError, path: str) -> OSError:
    """exc naming `path` (an OSError from write(2) or fsync(2) names no file); the same type."""
    if exc.filename is not None or exc.errno is None:
        return exc
    named = type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), path)
    named.__cause__ = exc.__cause__
    return named


def disk_full(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def check_room(path: str, need: int = MIN_FREE_BYTES) -> None:
    """OSError(ENOSPC) naming `path` when its filesystem has less than `need` bytes free (root
    counts the blocks reserved for it, as its writes may use them)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return  # the writes themselves will say what is wrong, with their path
    blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    if st.f_blocks and blocks * st.f_frsize < need:
        raise disk_full(path)


class DiskWait:
    """Runs a write again while it fails with a full disk: after 2 s, then twice as long each
    time up to 30 s, until it succeeds or a signal comes (Interrupted, the run left interrupted).

    `waiting` is the one line status shows meanwhile ("disk full: <path>: <error> (since <ts>)"),
    None otherwise; `log` gets a line when a wait starts and when it ends. Any other error is
    raised at once.
    """

    def __init__(self, interrupt: Interrupt, log: Callable[[str], None],
                 clock: Clock | None = None, first_s: float = FIRST_RETRY_S,
                 max_s: float = MAX_RETRY_S) -> None:
        self.interrupt = interrupt
        self.log = log
        self.clock = clock or clock_from_env()
        self.first_s, self.max_s = first_s, max_s
        self.waiting: str | None = None
        self._since = 0.0

    def run(self, fn: Callable[..., T], *args: object) -> T:
        delay = self.first_s
        while True:
            try:
                result = fn(*args)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                self._wait(exc, delay)
                delay = min(delay * 2, self.max_s)
                continue
            if self.waiting is not None:
                self.log(f"space is back after {time.monotonic() - self._since:.0f} s; "
                         "the run goes on")
                self.waiting = None
            return result

    def _wait(self, exc: OSError, delay: float) -> None:
        where = f"{exc.filename}: " if exc.filename else ""
        if self.waiting is None:
            self._since = time.monotonic()
            self.waiting = (f"disk full: {where}{exc.strerror or exc} (since {self.clock.iso()})")
            self.log(f"{self.waiting}; retrying every {self.first_s:g}-{self.max_s:g} s "
                     "until there is space")
        end = time.monotonic() + delay
        while True:
            if self.interrupt:
                raise self.interrupt.error("waiting for disk space")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(_POLL_S, left))


def daemon_waiting(out_dir: str, holder_pid: int | None, token: str | None,
                   timeout_s: float = 1.0) -> str | None:
    """What the daemon holding the run waits for, asked over its API (it keeps that in memory:
    on a full disk no file of the run can say it); None when no daemon holds the run or it does
    not answer within timeout_s."""
    if not holder_pid or holder_pid <= 0:
        return None
    import json
    try:
        with open(os.path.join(out_dir, "daemon.json"), "rb") as fh:
            info = json.loads(fh.read(4096))
        if not isinstance(info, dict) or info.get("pid") != holder_pid:
            return None
        host, port = str(info["host"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    import http.client
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/api/v1/status",
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        if resp.status != 200:
            return None
        view = json.loads(resp.read(1 << 20))
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    waiting = view.get("waiting") if isinstance(view, dict) else None
    return waiting if isinstance(waiting, str) else None
