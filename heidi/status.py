"""state.json: the whole current state of a run, replaced atomically (design.md §3.2), and the
status view that `heidi status --json` and the API show of it.

A cache of the journal: replaced by tmp file + rename so a reader never sees it torn, but never
fsynced -- after a power loss a stale, empty or missing state.json is rebuilt from the journal.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import time
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, Callable

from . import control
from ._fast import atomic as _atomic
from .errors import StateError
from .lock import lock_holder
from .loop import state_problem

if TYPE_CHECKING:
    from .config import Config


class StatusWriter:
    """Writes state.json whole (tmp file, rename); a reader never sees it torn.

    Not fsynced, whatever `fsync` says: durability is the journal's (design.md §3.2, README
    "Crash safety"). `fsync` is kept for callers that pass the run's setting.
    """

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync
        self._tmp, self._tmp_pid = "", -1
        self._dumps: Callable[[Any], bytes] | None = None

    def write(self, state: dict[str, Any]) -> Fingerprint | None:
        """Replace state.json; returns its fingerprint as written (see `fingerprint`)."""
        dumps = self._dumps
        if dumps is None:
            import orjson  # here: `heidi status` only reads
            # compact, with its newline: readers parse it, and it is written every tick
            dumps = self._dumps = functools.partial(orjson.dumps,
                                                    option=orjson.OPT_APPEND_NEWLINE)
        return _atomic.replace_file(self.path, self._tmp_path(), dumps(state))

    def _tmp_path(self) -> str:
        """This writer's tmp file, named once per process: a name used again each tick costs
        the filesystem less than a new one, and no other writer (process or StatusWriter)
        shares it."""
        pid = os.getpid()
        if pid != self._tmp_pid:  # first write, or a forked child: a name of its own
            dirname, base = os.path.split(self.path)
            self._tmp = os.path.join(dirname, f".{base}.{pid}.{next(_tmp_counter)}.tmp")
            self._tmp_pid = pid
        return self._tmp

    def read(self) -> dict[str, Any] | None:
        return read_state(self.path)


Fingerprint = tuple[int, int, int, int]


def fingerprint(path: str) -> Fingerprint | None:
    """(inode, device, size, mtime in ns) of path, None when it is missing: equal fingerprints
    mean a process that wrote the file can trust the copy it holds in memory."""
    return _atomic.fingerprint(path)


_tmp_counter = itertools.count()


# Far above any state.json heidi writes (a few KB): a larger file is not one, and is not read.
MAX_STATE_BYTES = 16 * 1024 * 1024


def read_state(path: str) -> dict[str, Any] | None:
    """The state in path, None when there is none; StateError when it is not a state heidi
    wrote (not a regular file, not a JSON object, or a key missing or of the wrong kind)."""
    try:
        # O_NONBLOCK: a FIFO put at the path must not hang `heidi status` (or a tick)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read ({exc.strerror})") from None
    st = os.fstat(fd)
    if not S_ISREG(st.st_mode) or st.st_size > MAX_STATE_BYTES:
        os.close(fd)
        raise StateError(f"{path}: not a regular file" if not S_ISREG(st.st_mode) else
                         f"{path}: {st.st_size} bytes, too large for a heidi state")
    with open(fd, "rb") as fh:
        try:
            data = fh.read(MAX_STATE_BYTES + 1)
        except OSError as exc:
            raise StateError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        # the stdlib's parser: a 1 KB file, and `heidi status` starts without importing orjson
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: not a JSON object")
    problem = state_problem(state)
    if problem is not None:
        raise StateError(f"{path}: not a heidi state: {problem}")
    return state


def interrupted(state: dict[str, Any] | None, config: Config) -> bool:
    """A stage was in flight and no process holds the run: its process was stopped or died, and
    the next tick, `heidi run` or daemon runs the stage again."""
    return (state is not None and state.get("status") == "running"
            and state.get("stage_status") == "running" and not _slurm_view(state)
            and lock_holder(config.lock_path) is None)


def _slurm_view(state: dict[str, Any]) -> dict[str, Any] | None:
    """The Slurm job of the running stage ({"job_id", "state", "name"}), None when there is
    none. A submitted job runs without heidi: its run is not interrupted meanwhile."""
    job = state.get("slurm_job")
    if not job or not job.get("id"):
        return None
    return {"job_id": job["id"], "state": job.get("state"), "name": job.get("name")}


def status_view(state: dict[str, Any] | None, config: Config,
                pending: list[str] | None = None) -> dict[str, Any]:
    """What `heidi status --json` and the API show: the state plus pending control requests.

    status is "interrupted" (and interrupted true) for a run whose stage was in flight when its
    process ended; the state on disk still says running, for the next holder to take up.
    pending: the queued actions when the caller has just listed them (else listed here)."""
    if pending is None:
        pending = [a for _, a in control.pending(config.control_dir)]
    if state is None:
        return {"run_id": None, "state": None, "status": "none", "round": 0, "mode": None,
                "stage": None, "paused": False, "out_dir": config.out_dir,
                "pending_requests": pending}
    stale = interrupted(state, config)
    view = {
        "run_id": state["run_id"], "state": state["state"],
        "status": "interrupted" if stale else state["status"], "interrupted": stale,
        "round": state["current_round"], "rounds": state["rounds"], "mode": state["mode"],
        "stage": state["current_stage"], "stage_status": state["stage_status"],
        "paused": state["paused"],
        "stop_requested": state["stop_requested"] or "stop" in pending,
        "pause_requested": state["pause_requested"] or "pause" in pending,
        "run_unit_tests": state["run_unit_tests"], "counters": state["counters"],
        "usage": state["usage"], "started_at": state["started_at"],
        "updated_at": state["updated_at"], "last_error": state["last_error"],
        "journal": state["journal"], "out_dir": config.out_dir, "pending_requests": pending,
        "usage_by_stage": state.get("usage_by_stage") or {},
        "stage_started_at": (state.get("stage_started_at")
                             if state["stage_status"] == "running" else None),
    }
    slurm = _slurm_view(state)
    if slurm is not None:
        view["slurm"] = slurm
    return view


LOG_TAIL_LINES = 10
LOG_LINE_CHARS = 500
_LOG_TAIL_BYTES = 16 * 1024
# ANSI escape sequences (colours, cursor moves) and other control characters a stage may print:
# a status line is shown on terminals and in a browser, never as the stage's terminal codes.
# compiled on first use (re caches it)
_ESCAPES = (r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?"
            r"|[\x00-\x08\x0b-\x1f\x7f]")


def epoch_of(ts: str | None) -> float | None:
    """Epoch seconds of a journal `ts` (2026-02-20T07:45:38.307Z), None when there is none.

    Parsed by hand for that one format (`heidi status` starts without importing datetime);
    anything else goes through clock.parse_ts."""
    if not ts:
        return None
    try:
        if len(ts) == 24 and ts[4] == "-" and ts[10] == "T" and ts[19] == "." and ts[23] == "Z":
            y, m, d = int(ts[0:4]), int(ts[5:7]), int(ts[8:10])
            # days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (civil_from_days)
            y -= m <= 2
            era = y // 400
            yoe = y - era * 400
            doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
            days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
            return (days * 86400 + int(ts[11:13]) * 3600 + int(ts[14:16]) * 60 + int(ts[17:19])
                    + int(ts[20:23]) / 1000.0)
        from .clock import parse_ts
        return parse_ts(ts)
    except ValueError:
        return None


def stage_log_path(config: "Config", round_: int, stage: str) -> str:
    """Where a stage's redacted output goes (heidi.stages writes it)."""
    return os.path.join(config.logs_dir, f"round_{round_}", f"{stage}.log")


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` non-empty lines of a stage log (already redacted when written), each as
    a terminal would show it last: the text after its last carriage return (a progress bar
    redrawn in place), escape sequences and control characters dropped, cut to LOG_LINE_CHARS."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            data = fh.read(_LOG_TAIL_BYTES)
    except OSError:
        return []
    text = data.decode("utf-8", "replace")
    if size > _LOG_TAIL_BYTES:
        text = text.partition("\n")[2]  # the first line read may be cut: not shown
    shown = []
    escapes = re.compile(_ESCAPES)
    for line in text.split("\n"):
        line = escapes.sub("", line.rstrip("\r").rpartition("\r")[2]).strip()
        if line:
            shown.append(line[:LOG_LINE_CHARS])
    return shown[-lines:]


def live_view(view: dict[str, Any], config: "Config", now: float | None = None) -> dict[str, Any]:
    """Add what shows a run is alive to a status view (in place; returned): elapsed in the run
    and in the running stage, the stage's log and its last lines. Keys: run_elapsed_s,
    stage_elapsed_s (None unless a stage runs in a live process), stage_log (None when the
    stage wrote none yet), stage_log_last_line, stage_log_tail."""
    now = time.time() if now is None else now
    started = epoch_of(view.get("started_at"))
    ended = view.get("status") in ("completed", "stopped", "error")
    end = epoch_of(view.get("updated_at")) if ended else now
    view["run_elapsed_s"] = (round(max(0.0, end - started), 3)
                             if started is not None and end is not None else None)
    stage_started = epoch_of(view.get("stage_started_at"))
    view["stage_elapsed_s"] = (round(max(0.0, now - stage_started), 3)
                               if stage_started is not None and not view.get("interrupted") else None)
    log = None
    if view.get("stage") and view.get("round"):
        path = stage_log_path(config, view["round"], view["stage"])
        if os.path.isfile(path):
            log = path
    tail = log_tail(log) if log else []
    view.update(stage_log=log, stage_log_last_line=tail[-1] if tail else None, stage_log_tail=tail)
    return view
