"""Stage cgroups: where heidi can create cgroup v2 children, each stage runs in its own, which is
killed whole (`cgroup.kill`) when the stage ends -- no setsid, double fork or cleared environment
escapes that -- and whose `cpu.stat` (and `memory.peak`, where the memory controller is on) is
the stage's usage. Used by `_supervise_core` (heidi's side) and `_supervise_watchdog` (W's side).
"""
# Where the stage cgroups go: heidi's own v2 cgroup (mount point from /proc/self/mountinfo, path
# from the "0::" line of /proc/self/cgroup; both found, never assumed). A cgroup that holds
# processes cannot enable controllers for its children ("no internal processes"), except the
# root; so under a delegated systemd unit heidi first moves itself (and its watchdog) into a leaf
# child, <unit>/heidi, and enables the controllers it can in <unit>, whose other children are the
# stages, <unit>/stage-<token>. Where nothing of that is allowed (no cgroup2, a cgroup not
# writable, HEIDI_CGROUP=0), stages are contained by process groups and the child subreaper.
from __future__ import annotations

import errno as _errno
import os
import signal
import threading
import time
from dataclasses import dataclass

__all__ = ("ENV", "PREFIX", "Containment", "StageCgroup", "containment", "disable",
           "find_mount", "own_cgroup", "reset")

ENV = "HEIDI_CGROUP"
PREFIX = "stage-"
LEAF = "heidi"
# Controllers a stage's cgroup should have, when heidi's cgroup may hand them down.
_WANTED = ("cpu", "memory", "pids")
# Errors that say "this process may not use cgroups here" (as opposed to a passing failure).
_REFUSED = (_errno.EACCES, _errno.EPERM, _errno.EROFS, _errno.ENOENT, _errno.ENOTDIR,
            _errno.EOPNOTSUPP, _errno.EBUSY, _errno.EINVAL, _errno.ENODEV)
PROCESS_KIND = "process groups + subreaper"


@dataclass(frozen=True)
class Containment:
    """How this process contains its stages: kind "cgroup" (stage cgroups go under `parent`)
    or "process" (`reason` says why not cgroups)."""

    kind: str
    parent: str | None = None
    reason: str = ""
    kill: bool = True       # cgroup.kill exists (Linux 5.14); else freeze + SIGKILL each pid
    memory: bool = False    # the memory controller is on for the stages: memory.peak

    def describe(self) -> str:
        if self.kind == "cgroup":
            return f"cgroup v2 at {self.parent}"
        return f"{PROCESS_KIND} ({self.reason})" if self.reason else PROCESS_KIND

    def as_dict(self) -> dict:
        return {"kind": self.kind, "parent": self.parent, "reason": self.reason or None,
                "cgroup_kill": self.kill if self.kind == "cgroup" else None,
                "memory": self.memory if self.kind == "cgroup" else None,
                "description": self.describe()}


# ---- finding the hierarchy ----------------------------------------------------------------------

def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(mountinfo: str | None = None) -> str | None:
    """The first cgroup2 mount point in /proc/self/mountinfo (or in the text given)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
                mountinfo = fh.read()
        except OSError:
            return None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) >= 5:
                return _unescape(fields[4])
    return None


def own_cgroup(pid: int | str = "self") -> str | None:
    """The process's cgroup v2 path (the "0::" line of /proc/PID/cgroup), e.g. "/" or
    "/system.slice/heidi-daemon.service"."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                if line.startswith("0::"):
                    path = line[3:].rstrip("\n")
                    return path if path.startswith("/") else None
    except OSError:
        pass
    return None


def _read(path: str) -> str | None:
    # Raw: this runs a few times per stage, and cgroup files are small ASCII.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pids(text: str | None) -> list[int]:
    return [int(x) for x in text.split()] if text else []


# ---- the decision -------------------------------------------------------------------------------

_lock = threading.Lock()
_decided: dict[str, Containment] = {}   # HEIDI_CGROUP's value -> this process's decision


def containment() -> Containment:
    """This process's containment, decided once per value of HEIDI_CGROUP (and again after a
    fork). HEIDI_CGROUP=0 turns cgroups off; any other value (or none) uses them if it can."""
    setting = os.environ.get(ENV, "")
    decided = _decided.get(setting)
    if decided is not None:
        return decided
    return _decide(setting)


def _decide(setting: str) -> Containment:
    with _lock:
        decided = _decided.get(setting)
        if decided is not None:
            return decided
        if setting.strip().lower() in ("0", "off", "no", "false"):
            result = Containment("process", reason=f"{ENV}={setting}")
        else:
            result = _probe()
        _decided[setting] = result
        return result


def disable(reason: str) -> Containment:
    """A stage found this process cannot use its cgroups after all: process containment from
    now on (for this value of HEIDI_CGROUP, until a fork)."""
    result = Containment("process", reason=reason)
    with _lock:
        _decided[os.environ.get(ENV, "")] = result
    return result


def reset() -> None:
    """Forget the decisions (tests; a forked child, which decides for itself)."""
    global _lock
    _lock = threading.Lock()
    _decided.clear()


os.register_at_fork(after_in_child=reset)


def _probe() -> Containment:
    mount = find_mount()
    if mount is None:
        return Containment("process", reason="no cgroup2 mount")
    path = own_cgroup()
    if path is None:
        return Containment("process", reason="no cgroup v2 entry in /proc/self/cgroup")
    base = os.path.normpath(mount + path)
    if not os.access(base, os.W_OK | os.X_OK):
        return Containment("process", reason=f"{base} is not writable")
    if path != "/":
        _enter_leaf(base)
    probe = os.path.join(base, f"{PREFIX}probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass
    except OSError as exc:
        return Containment("process", reason=f"cannot create a cgroup in {base}: {exc.strerror}")
    try:
        kill = os.path.exists(os.path.join(probe, "cgroup.kill"))
        memory = os.path.exists(os.path.join(probe, "memory.peak"))
        if not os.access(os.path.join(probe, "cgroup.procs"), os.W_OK):
            return Containment("process", reason=f"{probe}/cgroup.procs is not writable")
        if not kill and not os.path.exists(os.path.join(probe, "cgroup.freeze")):
            return Containment("process", reason="neither cgroup.kill nor cgroup.freeze (Linux < 5.2)")
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass
    return Containment("cgroup", parent=base, kill=kill, memory=memory)


def _enter_leaf(base: str) -> None:
    """Under a delegated unit: move this process and its children (the watchdog) into
    base/heidi and enable controllers in base, so the stages beside it get them. Nothing happens
    if base holds processes that are not ours, or if it already hands down what it can."""
    controllers = set((_read(os.path.join(base, "cgroup.controllers")) or "").split())
    enabled = set((_read(os.path.join(base, "cgroup.subtree_control")) or "").split())
    wanted = [c for c in _WANTED if c in controllers and c not in enabled]
    if not wanted:
        return
    me = os.getpid()
    procs = _pids(_read(os.path.join(base, "cgroup.procs")))
    ours = [p for p in procs if p == me or _ppid(p) == me]
    if len(ours) != len(procs):
        return  # another program shares the cgroup: it is not ours to rearrange
    leaf = os.path.join(base, LEAF)
    try:
        os.makedirs(leaf, exist_ok=True)
        for pid in ours:
            _write(os.path.join(leaf, "cgroup.procs"), str(pid).encode())
    except OSError:
        return
    for name in wanted:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{name}".encode())
        except OSError:
            pass  # not delegated to us, or busy: the stages go without it


def _ppid(pid: int) -> int:
    data = _read(f"/proc/{pid}/stat")
    if not data:
        return -1
    fields = data[data.rfind(")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else -1


# ---- one stage's cgroup -------------------------------------------------------------------------

def stage_path(parent: str, token: str) -> str:
    return os.path.join(parent, PREFIX + token)


class StageCgroup:
    """The cgroup of one stage: its directory, and (until the spawn) its cgroup.procs open for
    the new process to write itself into before it execs."""

    __slots__ = ("kill_file", "memory", "path", "procs_fd")

    def __init__(self, path: str, kill_file: bool = True, memory: bool = True) -> None:
        self.path = path
        self.procs_fd = -1
        self.kill_file = kill_file
        self.memory = memory

    @classmethod
    def create(cls, where: Containment, token: str) -> StageCgroup | None:
        """mkdir the stage's cgroup and open its cgroup.procs; None (and containment
        disabled when the error says cgroups are not ours to use) if that fails."""
        path = stage_path(where.parent or "", token)
        try:
            os.mkdir(path)
        except OSError as exc:
            if exc.errno in _REFUSED:
                disable(f"cannot create a cgroup in {where.parent}: {exc.strerror}")
            return None
        cg = cls(path, where.kill, where.memory)
        try:
            cg.procs_fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            cg.remove(0.0)
            disable(f"cannot open {path}/cgroup.procs: {exc.strerror}")
            return None
        return cg

    def spawned(self) -> None:
        """The stage's main process is in (or failed): the procs fd is no longer needed."""
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1

    def pids(self) -> list[int]:
        return _pids(_read(os.path.join(self.path, "cgroup.procs")))

    def populated(self) -> bool:
        text = _read(os.path.join(self.path, "cgroup.events"))
        if text is None:
            return False  # gone
        for line in text.splitlines():
            if line.startswith("populated "):
                return line[10:].strip() != "0"
        return bool(self.pids())

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, atomically where cgroup.kill exists."""
        if self.kill_file:
            try:
                _write(os.path.join(self.path, "cgroup.kill"), b"1")
                return
            except FileNotFoundError:
                if not os.path.isdir(self.path):
                    return
                self.kill_file = False
            except OSError:
                return
        # Older kernels: frozen, nothing in the cgroup can fork while it is emptied.
        freeze = os.path.join(self.path, "cgroup.freeze")
        try:
            _write(freeze, b"1")
        except OSError:
            pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            _write(freeze, b"0")
        except OSError:
            pass

    def usage(self) -> tuple[int, int, int | None] | None:
        """(user_usec, system_usec, memory.peak bytes or None) of everything that ran in the
        cgroup, or None if cpu.stat cannot be read."""
        text = _read(os.path.join(self.path, "cpu.stat"))
        if text is None:
            return None
        values = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
        if "user_usec" not in values or "system_usec" not in values:
            return None
        peak = _read(os.path.join(self.path, "memory.peak")) if self.memory else None
        return (values["user_usec"], values["system_usec"],
                int(peak) if peak and peak.strip().isdigit() else None)

    def remove(self, wait_s: float) -> bool:
        """rmdir the cgroup; if something is still in it, kill it and wait up to wait_s for it
        to empty. True when the directory is gone."""
        self.spawned()
        give_up = time.monotonic() + wait_s
        pause = 0.001
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != _errno.EBUSY:
                    return False
            if time.monotonic() >= give_up:
                return False
            if self.populated():
                self.kill()
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


# ---- what `heidi status` shows --------------------------------------------------------------------

def running_containment(holder: int | None) -> str:
    """The containment of the stage `holder` (the process holding a run) is running, told from
    its children's cgroups; without a holder or a running stage, what this process would use."""
    if holder:
        children = []
        try:
            tasks = os.listdir(f"/proc/{holder}/task")  # (a daemon runs stages in a thread)
        except OSError:
            tasks = []
        for task in tasks:
            children += _pids(_read(f"/proc/{holder}/task/{task}/children"))
        mount = find_mount()
        for child in children:
            if _read(f"/proc/{child}/comm") == "heidi-watchdog\n":
                continue
            path = own_cgroup(child)
            if mount and path and os.path.basename(path).startswith(PREFIX):
                return Containment("cgroup", parent=os.path.normpath(
                    mount + os.path.dirname(path))).describe()
            if path is not None:
                return Containment("process").describe()
    return containment().describe()
