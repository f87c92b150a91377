"""state.json: the whole current state of a run, replaced atomically (design.md §3.2), and the
status view that `heidi status --json` and the API show of it.

A cache of the journal: replaced by tmp file + rename so a reader never sees it torn, but never
fsynced -- after a power loss a stale, empty or missing state.json is rebuilt from the journal.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import TYPE_CHECKING, Any

from . import control
from ._fast import atomic as _atomic
from .errors import StateError
from .lock import lock_holder

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

    def write(self, state: dict[str, Any]) -> Fingerprint | None:
        """Replace state.json; returns its fingerprint as written (see `fingerprint`)."""
        import orjson  # here: `heidi status` only reads
        # compact: readers parse it (a person reads `heidi status`), and it is written every tick
        data = orjson.dumps(state, option=orjson.OPT_APPEND_NEWLINE)
        return replace_file(self.path, data, self._tmp_path())

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
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


_tmp_counter = itertools.count()


def replace_file(path: str, data: bytes, tmp: str | None = None) -> Fingerprint:
    """Replace path with data (mode 0600) by tmp file + rename, not synced; its fingerprint.

    atomic_write's steps, fewer syscalls for a file replaced every tick: the mode is fixed
    only when the umask cleared bits of it, and the fingerprint is the tmp file's fstat (the
    inode renamed into place, whose mtime a rename leaves alone) instead of a stat afterwards.
    tmp: a name in path's directory that only this caller uses (default: a new one).
    """
    if tmp is None:
        dirname, base = os.path.split(path)
        tmp = os.path.join(dirname, f".{base}.{os.getpid()}.{next(_tmp_counter)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:
        # left by a process that had this pid and died before its rename: the name is ours
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            _atomic.write_all(fd, data)
            st = os.fstat(fd)
            if st.st_mode & 0o7777 != 0o600:
                os.fchmod(fd, 0o600)  # the umask cleared bits we asked for
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def read_state(path: str) -> dict[str, Any] | None:
    """The state in path, None when there is none; StateError when it is not a JSON object."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        # the stdlib's parser: a 1 KB file, and `heidi status` starts without importing orjson
        state = json.loads(data)
    except ValueError as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: not a JSON object")
    return state


def interrupted(state: dict[str, Any] | None, config: Config) -> bool:
    """A stage was in flight and no process holds the run: its process was stopped or died, and
    the next tick, `heidi run` or daemon runs the stage again."""
    return (state is not None and state.get("status") == "running"
            and state.get("stage_status") == "running" and lock_holder(config.lock_path) is None)


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
    }
    return view
