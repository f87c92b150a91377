"""The stage watchdog: a sentinel process that kills heidi's stages if heidi dies.

Shared by `_supervise_py` and `_supervise_c` through `_supervise_core`; the rest of heidi uses
it through `heidi._fast.supervise`.
"""
# Why a watchdog process, and why it is out of the way:
#
# A stage must never outlive heidi, even when heidi is SIGKILLed. PR_SET_PDEATHSIG covers only a
# direct child, and a stage's grandchildren may setsid() and double-fork away from its process
# group. heidi spawns each stage itself (a stage costs what a bare posix_spawn costs) and is a
# *child subreaper* (PR_SET_CHILD_SUBREAPER), so while heidi lives every process a stage creates
# stays inside heidi's subtree, however it daemonizes, and heidi cleans up after each stage.
#
# For heidi's death there is W: a small process forked from heidi on first use, which shares one
# page of memory with heidi -- the registry of running stages (a slot per stage: its main pid,
# the clock tick it started at, its HEIDI_STAGE_TOKEN). heidi fills a slot before it spawns and
# clears it when nothing of the stage is left; a slot costs a few stores, no system call and no
# message, so W sleeps through every stage. W holds the read end of a pipe whose only write end
# is heidi's (the lifeline; close-on-exec, and closed in heidi's own forks by an at-fork hook).
# When heidi dies, by any signal, the kernel closes that end, W wakes, reads the registry and
# SIGKILLs every process of every stage in it: a stage that has a cgroup (see
# `_supervise_cgroup`) by its cgroup.kill, which nothing in the cgroup escapes, and then, for
# every stage, its process group and session, every process whose environment carries a stage's
# token, the processes heidi had adopted (W keeps a snapshot of them, every 20 ms while a stage
# without a cgroup is young, twice a second after, for a daemon that both left the session and
# dropped its environment), and all their descendants. A getppid() check twice a second is the
# second line, should the lifeline ever leak. If W itself dies, heidi starts a new one within a
# second; the registry, being heidi's memory, survives it.
from __future__ import annotations

import atexit
import collections
import ctypes
import gc
import mmap
import os
import select
import signal
import struct
import sys
import threading
import time
from collections.abc import Container, Iterable
from typing import Protocol

from . import _supervise_cgroup as _cg

__all__ = ("TOKEN_ENV", "GIVE_UP_S", "SIGNALS_TO_DEFAULT", "SLOTS", "descendants", "ensure_started",
           "has_token", "proc_stat", "registry", "scan_procs", "shutdown", "start_tick", "subreaper",
           "token_needle", "watchdog_pid")

TOKEN_ENV = "HEIDI_STAGE_TOKEN"
# W gives up on processes that do not die this long after SIGKILL (stuck in the kernel, e.g. a
# wedged GPU driver) rather than spin forever.
GIVE_UP_S = 5.0
# How often W wakes: to look at heidi's adopted children while stages run, and at getppid().
SNAPSHOT_S = 0.5
# ... and while a stage without a cgroup is younger than YOUNG_S, when a daemon it starts is
# most likely to detach: what W has not seen when heidi dies (setsid'd, env-less, adopted in
# the last YOUNG_SNAPSHOT_S) could escape.
YOUNG_SNAPSHOT_S = 0.005
YOUNG_S = 5.0
# Concurrent stages one heidi process can run (a slot each).
SLOTS = 128

# A slot: state, main pid, start tick, token (32 hex digits), in a cgroup (1: the stage's cgroup
# is <the parent written after the slots>/stage-<token>). state: 0 free, 1 spawning (the token
# is valid, the pid not yet), 2 running.
_SLOT = struct.Struct("=iiq32si")
_CGROUP_FLAG = struct.Struct("=i")
_CGROUP_FLAG_AT = 48
# After the slots: the directory the stage cgroups are in (length, then the path).
_PARENT_AT = SLOTS * 64
_PARENT_MAX = 4096 - 4 - 8
# Last in the page, written by W: the clock tick until which it looks every YOUNG_SNAPSHOT_S
# anyway (heidi then need not wake it for a new stage).
_FAST_UNTIL_AT = _PARENT_AT + 4 + _PARENT_MAX
_TICK = struct.Struct("=q")
_HEAD = struct.Struct("=iiq")
_STATE = struct.Struct("=i")
_SLOT_SIZE = 64
_FREE, _SPAWNING, _RUNNING = 0, 1, 2
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
# Every signal a stage (and W) starts with at its default: the C library's full set (sigfillset,
# what _supervise_c hands posix_spawn as SETSIGDEF) but the two that cannot be caught or ignored.
# The pure twin and the fork path reset exactly these.
SIGNALS_TO_DEFAULT = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _load_prctl():
    # Resolved here, at import: dlopen/dlsym after a fork could block on a loader lock that
    # another of heidi's threads held at the moment of the fork.
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def start_tick() -> int:
    """The clock tick (as in /proc/PID/stat's starttime) a process started now would show, less
    one for rounding: every process of a stage started at or after its stage's tick."""
    return int(time.clock_gettime(_CLOCK_BOOTTIME) * _CLK_TCK) - 1


# ---- /proc --------------------------------------------------------------------------------------

def _parse_stat(data: bytes) -> tuple[bytes, int, int, int, int] | None:
    # comm is in parentheses and may itself contain ") ": the fields start after the last ")".
    fields = data[data.rfind(b")") + 2:].split(None, 20)
    if len(fields) < 20:
        return None
    # state, ppid, pgid, sid, starttime (field 22 of the file, 20th after comm)
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _read_proc(path: str, size: int = 65536) -> bytes | None:
    """A /proc file's contents (a seq_file: a short read is its end), or None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, size)
        if len(data) == size:
            chunks = [data]
            while data:
                data = os.read(fd, 65536)
                chunks.append(data)
            data = b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data


def proc_stat(pid: int) -> tuple[bytes, int, int, int, int] | None:
    """(state, ppid, pgid, sid, start tick) of one process, or None if it is gone."""
    data = _read_proc(f"/proc/{pid}/stat", 1024)
    return None if data is None else _parse_stat(data)


def scan_procs() -> dict[int, tuple[bytes, int, int, int, int]]:
    """pid -> (state, ppid, pgid, sid, start tick) for every process; vanished ones skipped."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = proc_stat(int(name))
            if info is not None:
                procs[int(name)] = info
    return procs


def token_needle(token: str) -> bytes:
    return b"\0" + f"{TOKEN_ENV}={token}".encode() + b"\0"


def _environ(pid: int) -> bytes | None:
    data = _read_proc(f"/proc/{pid}/environ")
    return None if data is None else b"\0" + data


def has_token(pid: int, needle: bytes) -> bool:
    """needle is token_needle(token): whether the process's environment carries it."""
    env = _environ(pid)
    return env is not None and needle in env


def descendants(procs: dict, roots: Iterable[int], skip: Container[int] = frozenset()) -> list[int]:
    """The roots and every process below them, not entering the subtrees of skip."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, info in procs.items():
        children[info[1]].append(pid)
    found, todo = [], [pid for pid in roots if pid not in skip]
    seen = set(todo)
    while todo:
        pid = todo.pop()
        found.append(pid)
        for child in children.get(pid, ()):
            if child not in seen and child not in skip:
                seen.add(child)
                todo.append(child)
    return found


def children_of(pid: int) -> list[int] | None:
    """The children of pid's main thread (where a subreaper's adopted orphans go), or None where
    the kernel does not list them (CONFIG_PROC_CHILDREN)."""
    data = _read_proc(f"/proc/{pid}/task/{pid}/children")
    return None if data is None else [int(x) for x in data.split()]


# ---- the registry ---------------------------------------------------------------------------------

class StageSlot(Protocol):
    """What the registry keeps of a stage: its main pid (None before the spawn) and whether
    it was reaped."""

    pid: int | None
    reaped: bool


class Registry:
    """The running stages of this process: Python objects for heidi, and the shared page W reads
    (see the comment at the top)."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, _FAST_UNTIL_AT + 8)  # MAP_SHARED | MAP_ANONYMOUS
        self.parent = ""
        self.lock = threading.Lock()
        self.stages: list[StageSlot | None] = [None] * SLOTS
        self.free = list(range(SLOTS - 1, -1, -1))  # lowest slot first

    def acquire(self, stage: StageSlot, token: str, cgroup_parent: str | None = None) -> int:
        """A slot for a stage about to be spawned, or -1 when all are taken. cgroup_parent:
        the stage gets a cgroup there (W kills it if heidi dies)."""
        in_cgroup = 0
        with self.lock:
            if not self.free:
                return -1
            if cgroup_parent is not None:
                in_cgroup = self._set_parent(cgroup_parent)
            slot = self.free.pop()
            self.stages[slot] = stage
        _SLOT.pack_into(self.page, slot * _SLOT_SIZE, _SPAWNING, 0, 0, token.encode(), in_cgroup)
        return slot

    def _set_parent(self, parent: str) -> int:
        if parent == self.parent:
            return 1
        data = os.fsencode(parent)
        if len(data) > _PARENT_MAX or any(s is not None for s in self.stages):
            return 0  # (one parent per process; it changes only between stages)
        self.page[_PARENT_AT + 4:_PARENT_AT + 4 + len(data)] = data
        _STATE.pack_into(self.page, _PARENT_AT, len(data))
        self.parent = parent
        return 1

    def no_cgroup(self, slot: int) -> None:
        """The stage runs without a cgroup after all."""
        _CGROUP_FLAG.pack_into(self.page, slot * _SLOT_SIZE + _CGROUP_FLAG_AT, 0)

    def running(self, slot: int, pid: int, tick: int) -> None:
        # One store of state, pid and tick: W reads slots only once heidi is dead (and, for its
        # snapshots, tolerates a slot caught mid-write).
        _HEAD.pack_into(self.page, slot * _SLOT_SIZE, _RUNNING, pid, tick)

    def release(self, slot: int) -> None:
        _STATE.pack_into(self.page, slot * _SLOT_SIZE, _FREE)
        with self.lock:
            self.stages[slot] = None
            self.free.append(slot)

    def others(self, stage: StageSlot) -> list[StageSlot]:
        # One stage or none: read without the lock (a stage starting now is not one of ours).
        if len(self.free) >= SLOTS - 1:
            return []
        with self.lock:
            return [s for s in self.stages if s is not None and s is not stage]

    def read(self) -> list[tuple[int, int, int, str, bool]]:
        """(state, pid, tick, token, in a cgroup) of the slots in use, as W sees them."""
        out = []
        for slot in range(SLOTS):
            state, pid, tick, token, in_cgroup = _SLOT.unpack_from(self.page, slot * _SLOT_SIZE)
            if state in (_SPAWNING, _RUNNING):
                out.append((state, pid, tick, token.decode("ascii", "replace"), in_cgroup == 1))
        return out

    def cgroup_parent(self) -> str | None:
        size = _STATE.unpack_from(self.page, _PARENT_AT)[0]
        if not 0 < size <= _PARENT_MAX:
            return None
        return os.fsdecode(self.page[_PARENT_AT + 4:_PARENT_AT + 4 + size])


# ---- the watchdog process -----------------------------------------------------------------------

def _set_name(name: bytes) -> None:
    if _prctl is not None:
        _prctl(_PR_SET_NAME, ctypes.cast(ctypes.c_char_p(name), ctypes.c_void_p).value, 0, 0, 0)


class _Sentinel:
    """W's main loop. Runs in the forked child; never returns (os._exit)."""

    def __init__(self, lifeline: int, registry: Registry, heidi: int):
        self.lifeline, self.registry, self.heidi = lifeline, registry, heidi
        self.me = os.getpid()
        # pid -> start tick of the processes heidi had adopted at the last look.
        self.adopted: dict[int, int] = {}

    def _setup(self) -> None:
        # Objects inherited from heidi must never be finalized here: a finalizer closing an fd
        # number this process has since reused would cut W's own lifeline.
        gc.disable()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if null != fd:
                os.dup2(null, fd)
        # Inherited fds (heidi's lock file, stages' pipes, a listening socket) must not stay open
        # here: a reader would wait for EOF and a flock would not be released. Kept: the lifeline,
        # and the one-file build's mark on the directory heidi runs from (heidi.bootloader), so
        # no later heidi removes that directory while W still runs from it.
        bootloader = sys.modules.get("heidi.bootloader")
        keep = sorted({self.lifeline, getattr(bootloader, "alive_fd", -1)} - {-1})
        low = 3
        for fd in keep:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, 1 << 20)
        try:
            os.setpgid(0, 0)  # away from the terminal's job control: ^C reaches heidi, not W
        except OSError:
            pass
        # Signals are blocked since before the fork (see _Client._start): heidi's own handlers,
        # inherited, must never run here. Replace them all, then unblock.
        for sig in SIGNALS_TO_DEFAULT:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _set_name(b"heidi-watchdog")
        os.chdir("/")

    def run(self) -> None:
        try:
            self._setup()
            poller = select.poll()
            poller.register(self.lifeline, select.POLLIN)
            wait_ms = int(SNAPSHOT_S * 1000)
            while True:
                if poller.poll(wait_ms) and not os.read(self.lifeline, 4096):
                    break  # heidi is gone (lifeline EOF); a byte read is a wake() from heidi
                if os.getppid() != self.heidi:
                    break  # heidi is gone and the lifeline somehow was not closed
                wait_ms = int(self._snapshot() * 1000)
            self._kill_stages()
        finally:
            os._exit(0)

    def _snapshot(self) -> float:
        """Note what heidi has adopted; returns how long to wait before the next look."""
        slots = self.registry.read()
        # Stages in a cgroup need no snapshot: their cgroup holds whatever they started.
        ticks = [tick for state, _, tick, _, in_cgroup in slots
                 if state == _RUNNING and not in_cgroup]
        if not ticks:
            self.adopted = {}
            _TICK.pack_into(self.registry.page, _FAST_UNTIL_AT, 0)
            return SNAPSHOT_S
        oldest = min(ticks)
        fast_until = int(max(ticks) + YOUNG_S * _CLK_TCK)
        young = fast_until >= start_tick()
        _TICK.pack_into(self.registry.page, _FAST_UNTIL_AT, fast_until if young else 0)
        mains = {pid for state, pid, _, _, _ in slots if state == _RUNNING}
        adopted = {}
        for pid in children_of(self.heidi) or ():
            if pid == self.me or pid in mains:
                continue
            info = proc_stat(pid)
            if info is not None and oldest is not None and info[4] >= oldest:
                adopted[pid] = info[4]
        if os.getppid() != self.heidi:
            # heidi died while this look was taken: its orphans (and W) were re-parented in
            # the same step, so the look may have found none. Keep the last whole one for the
            # kill that follows.
            return 0.0
        self.adopted = adopted
        return YOUNG_SNAPSHOT_S if young else SNAPSHOT_S

    def _kill_stages(self) -> None:
        slots = self.registry.read()
        if not slots:
            return
        give_up = time.monotonic() + GIVE_UP_S
        parent = self.registry.cgroup_parent()
        cgroups = [_cg.StageCgroup(_cg.stage_path(parent, token))
                   for _, _, _, token, in_cgroup in slots if in_cgroup and parent]
        for cgroup in cgroups:
            cgroup.kill()  # the whole stage at once, however it hid from the scan below
        try:
            self._kill_processes(slots, give_up)
        finally:
            for cgroup in cgroups:
                cgroup.remove(max(0.1, give_up - time.monotonic()))

    def _kill_processes(self, slots: list, give_up: float) -> None:
        mains = {pid: tick for state, pid, tick, _, _ in slots if state == _RUNNING and pid > 0}
        needles = [token_needle(token) for _, _, _, token, _ in slots]
        # A stage caught between spawn and exec carries heidi's environment, not its token, for
        # a moment: look again a little later before concluding nothing is left.
        second_looks = 3 if any(state == _SPAWNING for state, _, _, _, _ in slots) else 1
        while time.monotonic() < give_up:
            procs = scan_procs()
            roots = []
            for pid, (_, _, pgid, sid, tick) in procs.items():
                if pid == self.me:
                    continue
                if (pid in mains and tick >= mains[pid]) or pgid in mains or sid in mains \
                        or self.adopted.get(pid) == tick:
                    roots.append(pid)
                else:
                    env = _environ(pid)
                    if env is not None and any(needle in env for needle in needles):
                        roots.append(pid)
            victims = [pid for pid in descendants(procs, roots, {self.me})
                       if procs[pid][0] != b"Z"]
            if not victims:
                second_looks -= 1
                if second_looks <= 0:
                    return
                time.sleep(0.05)
                continue
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)


# ---- heidi's side ---------------------------------------------------------------------------------

class _Client:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registry: Registry | None = None
        self.lifeline = -1
        self.pid: int | None = None
        self.owner: int | None = None
        self.subreaper = False

    def forget(self) -> None:
        """In a forked child: the watchdog and the registry belong to the parent (and the lock
        may have been held by one of its other threads)."""
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        lifeline = self.lifeline
        self.registry, self.lifeline, self.pid, self.owner = None, -1, None, None
        self.subreaper = False
        if lifeline >= 0:
            try:
                os.close(lifeline)
            except OSError:
                pass

    def _start(self) -> Registry:
        if self.registry is None:
            self.registry = Registry()
        if not self.subreaper and _prctl is not None:
            self.subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        registry = self.registry  # the at-fork hook clears self.* in the child
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)  # a wake-up (see wake()) must never block heidi
        parent_pid = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS_TO_DEFAULT)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # the watchdog; never returns
            try:
                os.close(write_end)
                _Sentinel(read_end, registry, parent_pid).run()
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_end)
        self.lifeline, self.pid, self.owner = write_end, pid, parent_pid
        return registry

    def ensure(self) -> Registry:
        with self.lock:
            if self.owner is not None and self.owner != os.getpid():
                self._reset()  # forked without the at-fork hook (a fork from C code)
            registry = self.registry  # set whenever pid is
            if self.pid is not None:
                try:
                    if os.waitpid(self.pid, os.WNOHANG)[0] == 0 and registry is not None:
                        return registry  # alive
                except ChildProcessError:
                    pass  # reaped by someone else: dead too
                os.close(self.lifeline)
                self.lifeline, self.pid = -1, None
            return self._start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        # Bounded: at exit, a thread holding the lock must not keep heidi alive.
        locked = self.lock.acquire(timeout=min(1.0, timeout_s))
        try:
            pid = self.pid if self.owner == os.getpid() else None
            if self.lifeline >= 0 and self.owner == os.getpid():
                os.close(self.lifeline)
            self.lifeline, self.pid = -1, None
        finally:
            if locked:
                self.lock.release()
        if pid is None:
            return
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            if time.monotonic() >= give_up:
                return
            time.sleep(0.005)


_client = _Client()
os.register_at_fork(after_in_child=_client.forget)
# An orderly exit reaps W (which kills any stage still registered) instead of leaving it to init.
atexit.register(_client.shutdown, 0.5)


def ensure_started() -> int:
    """Start the watchdog now if it is not running (a daemon may call this before it starts
    threads) and make this process a child subreaper. Returns the watchdog's pid."""
    _client.ensure()
    return _client.pid or 0


def wake(tick: int) -> None:
    """Have W look at heidi's adopted children now (a stage without a cgroup just started at
    tick): W sleeps SNAPSHOT_S while no such stage runs, and a daemon the stage starts may
    detach at once. Nothing to do while W looks often anyway."""
    lifeline, registry = _client.lifeline, _client.registry
    if registry is not None and _TICK.unpack_from(registry.page, _FAST_UNTIL_AT)[0] > tick + 1:
        return
    if lifeline >= 0:
        try:
            os.write(lifeline, b"w")
        except OSError:
            pass  # full (W is busy: it looks soon anyway) or W is being replaced


def registry() -> Registry:
    """The registry of this process's stages, with a live watchdog reading it."""
    client = _client
    known = client.registry  # set whenever pid is
    if client.pid is not None and client.owner == os.getpid():
        try:
            if os.waitpid(client.pid, os.WNOHANG)[0] == 0 and known is not None:
                return known  # W is alive: the common case, without the lock
        except ChildProcessError:
            pass
    return client.ensure()


def owner() -> int:
    """The pid of the process the watchdog serves (this one, after registry())."""
    return _client.owner or os.getpid()


def subreaper() -> bool:
    """Whether this process is a child subreaper (set by ensure_started). The at-fork hook
    clears it in a child, which a subreaper's children are not."""
    return _client.subreaper


def watchdog_pid() -> int | None:
    return _client.pid if _client.owner == os.getpid() else None


def current_watchdog() -> int | None:
    """watchdog_pid() for a caller known not to be in a forked child (a running stage's
    supervisor): no getpid()."""
    return _client.pid


def shutdown(timeout_s: float = 5.0) -> None:
    """Close the lifeline and reap the watchdog (it kills any stage still registered). For tests
    and orderly exits; a process that just exits gets the same effect."""
    _client.shutdown(timeout_s)
