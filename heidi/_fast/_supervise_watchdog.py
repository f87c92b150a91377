"""The stage watchdog: a helper process that starts stages, owns them, and dies with heidi.

Shared by `_supervise_py` and `_supervise_c` (they differ only in the supervisor's wait loop); the
rest of heidi uses it through `heidi._fast.supervise`.
"""
# Why a watchdog process, and why one per heidi process:
#
# A stage must never outlive heidi, even when heidi is SIGKILLed. PR_SET_PDEATHSIG covers only a
# direct child, and a stage's grandchildren may setsid() and double-fork away from its process
# group. So a small process W, forked from heidi on first use, does the spawning: W is a *child
# subreaper* (PR_SET_CHILD_SUBREAPER), so every process a stage ever creates stays inside W's
# subtree, however it daemonizes. heidi holds the only other end of W's control socket (the
# lifeline; close-on-exec, and closed in heidi's own forks by an at-fork hook). When heidi dies,
# by any signal, the kernel closes that end, W reads EOF, SIGKILLs its whole subtree, reaps it,
# and exits. A getppid() check every second is the second line, should the lifeline ever leak.
#
# W is forked once and reused: forking a Python process costs about as much as starting
# /bin/true (page tables are copied), while W itself is small and spawns each stage with
# posix_spawn (vfork-fast). A stage costs one request on the socket and one status message.
#
# Protocol. heidi -> W, on the control socket: frames of 4-byte big-endian length + marshal:
#   ("spawn", sid, argv, env, cwd, rlimits, grace_s, token)  with SCM_RIGHTS [output write
#                                                             end, status write end]
#   ("term", sid)   SIGTERM the stage's processes, SIGKILL them grace_s later
#   ("kill", sid)   SIGKILL them now
# W -> heidi, on the stage's own status pipe, exactly one frame, sent when no process of the
# stage is left:  ("exited", pid, wait_status, maxrss_kb, utime_s, stime_s)  or
#                 ("failed", one-line message)  when the stage could not start.
# A stage's processes are: its main process's subtree; with several stages running at once,
# also the orphans W adopted whose process group / session is the stage's or whose environment
# carries the stage's HEIDI_STAGE_TOKEN; with one stage running, everything under W.
from __future__ import annotations

import array
import atexit
import collections
import ctypes
import errno as _errno
import fcntl
import gc
import itertools
import marshal
import os
import resource
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence

from ._supervise_types import StageResult

__all__ = ("TOKEN_ENV", "DRAIN_S", "W_SILENT_S", "PIPE_SIZE", "PIPE_DEFAULT_SIZE", "Launch",
           "StatusReader", "abort", "build_result", "check_args", "ensure_started", "grow_pipe",
           "kill_by_token", "kill_watchdog", "launch", "request_kill", "request_term",
           "shutdown", "watchdog_pid")

TOKEN_ENV = "HEIDI_STAGE_TOKEN"
# After W reports the end, output still in the pipe is read; a writer that somehow escaped (it
# passed its stdout to an unrelated process) cannot keep the supervisor waiting beyond this.
DRAIN_S = 2.0
# W gives up on processes that do not die this long after SIGKILL (stuck in the kernel, e.g. a
# wedged GPU driver) and reports what it has, rather than hanging heidi.
GIVE_UP_S = 5.0
# The supervisor gives up on W itself this long after W should have reported.
W_SILENT_S = GIVE_UP_S + 5.0
# Whether W may use pidfds (tests turn it off to exercise the SIGCHLD path of older kernels).
USE_PIDFD = True
PIPE_SIZE = 1 << 20
# A read this large means the pipe (64 KiB by default) was full: time to grow it to PIPE_SIZE.
PIPE_DEFAULT_SIZE = 1 << 16

_HEADER = struct.Struct("!I")
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_F_SETPIPE_SZ = 1031
_SIGNALS_TO_DEFAULT = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))
_RLIMIT_NAMES = {getattr(resource, n): n for n in sorted(dir(resource), reverse=True)
                 if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"}  # the BSD alias of NOFILE


def _load_prctl():
    # Resolved here, in heidi, not in W: dlopen/dlsym after fork could block on a loader lock
    # that another of heidi's threads held at the moment of the fork.
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _frame(msg: tuple) -> bytes:
    payload = marshal.dumps(msg)
    return _HEADER.pack(len(payload)) + payload


def _strerror(number: int) -> str:
    return os.strerror(number) if number else "unknown error"


# ---- /proc --------------------------------------------------------------------------------------

def _scan_procs() -> dict[int, tuple[bytes, int, int, int]]:
    """pid -> (state, ppid, pgid, sid) for every process; vanished ones are skipped."""
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            data = os.read(fd, 1024)
        except OSError:
            continue
        finally:
            os.close(fd)
        # comm is in parentheses and may itself contain ") ": the fields start after the last ")".
        fields = data[data.rfind(b")") + 2:].split(None, 4)
        if len(fields) >= 4:
            procs[int(name)] = (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return procs


def _has_token(pid: int, needle: bytes) -> bool:
    """needle is b"\\0HEIDI_STAGE_TOKEN=<token>\\0"."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        chunks = [b"\0"]
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
    except OSError:
        return False
    finally:
        os.close(fd)
    return needle in b"".join(chunks)


def _token_needle(token: str) -> bytes:
    return b"\0" + f"{TOKEN_ENV}={token}".encode() + b"\0"


def _descendants(procs: dict, roots: list[int], skip: set[int] = frozenset()) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, info in procs.items():
        children[info[1]].append(pid)
    found, todo = [], list(roots)
    seen = set(todo)
    while todo:
        pid = todo.pop()
        found.append(pid)
        for child in children.get(pid, ()):
            if child not in seen and child not in skip:
                seen.add(child)
                todo.append(child)
    return found


def kill_by_token(token: str) -> None:
    """Last resort when the watchdog is gone: SIGKILL every process carrying the stage's token."""
    needle = _token_needle(token)
    for _ in range(3):
        hit = [pid for pid in _scan_procs() if pid != os.getpid() and _has_token(pid, needle)]
        if not hit:
            return
        for pid in hit:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


# ---- the watchdog process -----------------------------------------------------------------------

class _Shutdown(BaseException):
    pass


def _raise_shutdown(signum, frame):
    raise _Shutdown()


def _noop(signum, frame):
    pass


class _Stage:
    __slots__ = ("sid", "pid", "needle", "status_fd", "out_fd", "pidfd", "grace_s", "phase",
                 "reaped", "status", "rusage", "kill_at")

    RUNNING, TERM, KILL = 0, 1, 2

    def __init__(self, sid: int, pid: int, token: str, status_fd: int, out_fd: int,
                 grace_s: float):
        self.sid, self.pid, self.status_fd, self.grace_s = sid, pid, status_fd, grace_s
        # W keeps a copy of the output pipe's write end until it reports: the supervisor then
        # sees the status and the end of output in one wakeup instead of two.
        self.out_fd = out_fd
        self.pidfd = -1
        self.needle = _token_needle(token)
        self.phase = _Stage.RUNNING
        self.reaped = False
        self.status: int | None = None
        self.rusage = (0, 0.0, 0.0)
        self.kill_at = 0.0


class _Server:
    """The watchdog's main loop. Runs in the forked child; never returns (os._exit)."""

    def __init__(self, ctl: socket.socket, parent_pid: int):
        self.ctl = ctl
        self.ctl_fd = ctl.fileno()
        self.parent_pid = parent_pid
        self.me = os.getpid()
        self.stages: dict[int, _Stage] = {}
        self.by_pid: dict[int, _Stage] = {}
        self.inbuf = bytearray()
        self.infds: collections.deque[int] = collections.deque()
        self.has_children = False

    def _setup(self) -> None:
        # Objects inherited from heidi must never be finalized here: a finalizer closing an fd
        # number this process has since reused would cut W's own pipes.
        gc.disable()
        keep = self.ctl.fileno()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if null != fd:
                os.dup2(null, fd)
        # Inherited fds (heidi's lock file, other children's pipes, a listening socket) must not
        # stay open here: a reader would wait for EOF and a flock would not be released.
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 20)
        try:
            os.setpgid(0, 0)  # away from the terminal's job control: ^C reaches heidi, not W
        except OSError:
            pass
        # Signals are blocked since before the fork (see _Client._start): heidi's own handlers,
        # inherited, must never run here. Replace them all, then unblock.
        for sig in _SIGNALS_TO_DEFAULT:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTSTP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _raise_shutdown)
        self.poller = select.poll()
        self.poller.register(self.ctl.fileno(), select.POLLIN)
        # A stage's end wakes W through a pidfd (Linux 5.3+); older kernels get SIGCHLD through
        # a wakeup pipe. Orphans W adopted are reaped at the next wake either way.
        self.wake_r = -1
        try:
            if not USE_PIDFD:
                raise OSError("pidfds disabled")
            os.close(os.pidfd_open(self.me))
            self.use_pidfd = True
        except (AttributeError, OSError):
            self.use_pidfd = False
            self.wake_r, wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(wake_w, False)
            signal.signal(signal.SIGCHLD, _noop)
            signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
            self.poller.register(self.wake_r, select.POLLIN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if _prctl is not None:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            _prctl(_PR_SET_NAME, ctypes.cast(ctypes.c_char_p(b"heidi-watchdog"),
                                             ctypes.c_void_p).value, 0, 0, 0)
        os.chdir("/")

    def run(self) -> None:
        try:
            self._setup()
            while True:
                now = time.monotonic()
                events = self.poller.poll(self._timeout_ms(now))
                for fd, _ in events:
                    if fd == self.ctl_fd:
                        if not self._read_ctl():
                            return  # heidi is gone (lifeline EOF)
                    elif fd == self.wake_r:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                    # else a stage's pidfd: its main process ended; reaped below
                self._reap()
                self._advance(time.monotonic())
                if os.getppid() != self.parent_pid:
                    return  # heidi is gone and the lifeline somehow was not closed
        except BaseException:  # noqa: BLE001 - whatever happens, the stages must not survive W
            pass
        finally:
            self._kill_everything()
            os._exit(0)

    def _timeout_ms(self, now: float) -> int:
        timeout = 1.0
        for stage in self.stages.values():
            if stage.phase == _Stage.KILL:
                timeout = min(timeout, 0.02)
            elif stage.phase == _Stage.TERM:
                # Leftovers that are not W's children wake nothing here: look again soon.
                timeout = min(timeout, 0.05 if stage.reaped else max(0.0, stage.kill_at - now))
        if not self.stages and self.has_children:
            timeout = min(timeout, 0.05)
        return int(timeout * 1000) + (1 if timeout > 0 else 0)

    # -- requests

    def _read_ctl(self) -> bool:
        # Not socket.recv_fds: it drops its flags argument, and these fds must be close-on-exec
        # from the start, or the next stage would inherit another stage's pipes.
        data, ancdata, _, _ = self.ctl.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4),
                                               socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.infds.extend(fds)
        if not data:
            return False
        self.inbuf += data
        while len(self.inbuf) >= 4:
            (size,) = _HEADER.unpack_from(self.inbuf)
            if len(self.inbuf) < 4 + size:
                break
            msg = marshal.loads(bytes(self.inbuf[4:4 + size]))
            del self.inbuf[:4 + size]
            self._handle(msg)
        return True

    def _handle(self, msg: tuple) -> None:
        op = msg[0]
        if op == "spawn":
            _, sid, argv, env, cwd, rlimits, grace_s, token = msg
            out_w, status_w = self.infds.popleft(), self.infds.popleft()
            self._spawn(sid, argv, env, cwd, rlimits, grace_s, token, out_w, status_w)
            return
        stage = self.stages.get(msg[1])
        if stage is None:
            return  # already finished: the request crossed the status message
        now = time.monotonic()
        if op == "term" and stage.phase == _Stage.RUNNING:
            self._start_term(stage, now)
        elif op == "kill" and stage.phase != _Stage.KILL:
            stage.phase, stage.kill_at = _Stage.KILL, now
            self._signal(stage, self._members(stage), signal.SIGKILL)

    def _spawn(self, sid, argv, env, cwd, rlimits, grace_s, token, out_w, status_w) -> None:
        pid, error = None, None
        try:
            try:
                # Always by path, even if unchanged: the directory may have been replaced. W then
                # stays there (one chdir per stage, not two).
                os.chdir(cwd)
            except OSError as exc:
                error = f"cannot change directory to {os.fsdecode(cwd)!r}: {_strerror(exc.errno)}"
            else:
                pid, error = self._exec(argv, env, rlimits, out_w)
        except Exception as exc:  # noqa: BLE001 - a bad request must not take W (and others) down
            error = f"cannot start {os.fsdecode(argv[0]) if argv else '?'!r}: {exc}"
        if pid is None:
            _send_status(status_w, ("failed", error or "cannot start the stage"))
            os.close(status_w)
            os.close(out_w)
            return
        stage = _Stage(sid, pid, token, status_w, out_w, grace_s)
        self.stages[sid] = stage
        self.by_pid[pid] = stage
        self.has_children = True
        if self.use_pidfd:
            try:
                stage.pidfd = os.pidfd_open(pid)
                self.poller.register(stage.pidfd, select.POLLIN)
            except OSError:
                pass  # found at the next periodic reap

    def _exec(self, argv, env, rlimits, out_w) -> tuple[int | None, str | None]:
        candidates = _candidates(argv[0], env)
        if rlimits:
            return _fork_exec(candidates, argv, env, rlimits, out_w)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, out_w, 2)]
        saved = last = 0
        for path in candidates:
            try:
                return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                                      setsigdef=_SIGNALS_TO_DEFAULT, setsigmask=()), None
            except OSError as exc:
                # execvp semantics: ENOENT/ENOTDIR mean "try the next PATH entry"; any other
                # error (EACCES...) is the one worth reporting if nothing works.
                if exc.errno not in (_errno.ENOENT, _errno.ENOTDIR) and not saved:
                    saved = exc.errno
                last = exc.errno
        return None, f"cannot execute {os.fsdecode(argv[0])!r}: {_strerror(saved or last)}"

    # -- children

    def _reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.has_children = False
                return
            except InterruptedError:
                continue
            if pid == 0:
                self.has_children = True
                return
            stage = self.by_pid.pop(pid, None)
            if stage is not None:
                stage.reaped, stage.status = True, status
                stage.rusage = (ru.ru_maxrss, ru.ru_utime, ru.ru_stime)
                if stage.pidfd >= 0:
                    self.poller.unregister(stage.pidfd)
                    os.close(stage.pidfd)
                    stage.pidfd = -1

    def _members(self, stage: _Stage) -> list[tuple[int, int]]:
        """(pid, pgid) of the stage's live processes other than an unreaped main process."""
        if stage.reaped and not self.has_children:
            return []  # W is a subreaper: no children at all means no descendants at all
        procs = _scan_procs()
        live_mains = {s.pid for s in self.stages.values() if not s.reaped}
        mine = [pid for pid, info in procs.items() if info[1] == self.me]
        if len(self.stages) == 1:
            roots, skip = mine, set()
        else:
            roots = [stage.pid] if not stage.reaped else []
            for pid in mine:
                if pid in live_mains:
                    continue
                _, _, pgid, sid = procs[pid]
                if stage.pid in (pgid, sid) or _has_token(pid, stage.needle):
                    roots.append(pid)
            skip = live_mains - {stage.pid}
        return [(pid, procs[pid][2]) for pid in _descendants(procs, roots, skip)
                if procs[pid][0] != b"Z" and not (pid == stage.pid and not stage.reaped)]

    def _signal(self, stage: _Stage, members: list[tuple[int, int]], sig: int) -> None:
        group = not stage.reaped  # the group id is ours only while the main is unreaped
        if group:
            try:
                os.killpg(stage.pid, sig)
            except OSError:
                pass
        for pid, pgid in members:
            if group and pgid == stage.pid and sig != signal.SIGKILL:
                continue  # got it through the group; a second SIGTERM may run a handler twice
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def _start_term(self, stage: _Stage, now: float) -> None:
        stage.phase, stage.kill_at = _Stage.TERM, now + stage.grace_s
        members = self._members(stage)
        self._signal(stage, members, signal.SIGTERM)
        # A stopped process (^Z, SIGSTOP) would hold SIGTERM pending until the SIGKILL.
        self._signal(stage, members, signal.SIGCONT)

    def _advance(self, now: float) -> None:
        for stage in list(self.stages.values()):
            if stage.phase == _Stage.RUNNING:
                if stage.reaped:
                    # The main process ended by itself: whatever it left behind goes too.
                    if self._members(stage):
                        self._start_term(stage, now)
                    else:
                        self._finish(stage)
                continue
            if stage.phase == _Stage.TERM:
                if now < stage.kill_at:
                    if stage.reaped and not self._members(stage):
                        self._finish(stage)
                    continue
                stage.phase = _Stage.KILL
            members = self._members(stage)
            if stage.reaped and not members:
                self._finish(stage)
            elif now >= stage.kill_at + GIVE_UP_S:
                self._finish(stage)
            else:
                self._signal(stage, members, signal.SIGKILL)
        if not self.stages and self.has_children:
            # Strays that could not be told apart while several stages ran: nothing runs now.
            self._kill_tree()

    def _finish(self, stage: _Stage) -> None:
        maxrss, utime, stime = stage.rusage
        _send_status(stage.status_fd, ("exited", stage.pid, stage.status, maxrss, utime, stime))
        os.close(stage.status_fd)
        os.close(stage.out_fd)
        if stage.pidfd >= 0:  # given up on an unkillable main process
            self.poller.unregister(stage.pidfd)
            os.close(stage.pidfd)
        del self.stages[stage.sid]
        self.by_pid.pop(stage.pid, None)

    def _kill_tree(self) -> None:
        procs = _scan_procs()
        roots = [pid for pid, info in procs.items() if info[1] == self.me]
        for pid in _descendants(procs, roots):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _kill_everything(self) -> None:
        try:
            for stage in self.stages.values():
                if not stage.reaped:
                    try:
                        os.killpg(stage.pid, signal.SIGKILL)
                    except OSError:
                        pass
            give_up = time.monotonic() + GIVE_UP_S
            while True:
                self._kill_tree()
                self._reap()
                if not self.has_children or time.monotonic() >= give_up:
                    break
                time.sleep(0.01)
            for stage in list(self.stages.values()):
                self._finish(stage)
        except BaseException:  # noqa: BLE001 - exiting anyway
            pass


def _send_status(fd: int, msg: tuple) -> None:
    try:
        os.write(fd, _frame(msg))
    except OSError:
        pass  # the supervisor is gone; nobody to tell


def _candidates(name: bytes, env: Mapping[bytes, bytes]) -> list[bytes]:
    if b"/" in name:
        return [name]
    path = env.get(b"PATH", os.fsencode(os.defpath))
    return [os.path.join(d or b".", name) for d in path.split(b":")]


def _fork_exec(candidates, argv, env, rlimits, out_w) -> tuple[int | None, str | None]:
    """The slow path, for rlimits: posix_spawn cannot set them, and W must keep its own."""
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"exec:0:"
        try:
            os.setsid()
            for sig in _SIGNALS_TO_DEFAULT:
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            for res, soft, hard in rlimits:
                try:
                    resource.setrlimit(res, (soft, hard))
                except (OSError, ValueError) as exc:
                    num = getattr(exc, "errno", None) or _errno.EINVAL
                    message = f"rlimit:{num}:{res},{soft},{hard}".encode()
                    raise
            saved = last = 0
            for path in candidates:
                try:
                    os.execve(path, argv, env)
                except OSError as exc:
                    if exc.errno not in (_errno.ENOENT, _errno.ENOTDIR) and not saved:
                        saved = exc.errno
                    last = exc.errno
            message = f"exec:{saved or last}:".encode()
        except BaseException:  # noqa: BLE001 - report, never run heidi code in the stage
            pass
        try:
            os.write(err_w, message)
        finally:
            os._exit(127)
    os.close(err_w)
    try:
        chunks = []
        while True:
            data = os.read(err_r, 512)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(err_r)
    if not chunks:
        return pid, None  # exec succeeded: the close-on-exec pipe closed with nothing in it
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    what, num, extra = b"".join(chunks).decode().split(":", 2)
    if what == "rlimit":
        res, soft, hard = (int(x) for x in extra.split(","))
        name = _RLIMIT_NAMES.get(res, f"resource {res}")
        return None, f"cannot set {name} to ({soft}, {hard}): {_strerror(int(num))}"
    return None, f"cannot execute {os.fsdecode(argv[0])!r}: {_strerror(int(num))}"


# ---- the supervisor's side ----------------------------------------------------------------------

class _Client:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.owner: int | None = None
        self.dead: list[int] = []  # replaced watchdogs not reaped yet (SIGKILL is not instant)

    def forget(self) -> None:
        """In a forked child: the watchdog belongs to the parent; close our copy of its lifeline."""
        sock, self.sock, self.pid, self.owner = self.sock, None, None, None
        self.lock = threading.Lock()
        self.dead = []
        if sock is not None:
            sock.close()

    def _start(self) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_pid = os.getpid()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS_TO_DEFAULT)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            parent_end.close()
            child_end.close()
            raise
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pid == 0:  # the watchdog; never returns
            try:
                parent_end.close()
                _Server(child_end, parent_pid).run()
            finally:
                os._exit(0)
        child_end.close()
        parent_end.settimeout(W_SILENT_S)
        self.sock, self.pid, self.owner = parent_end, pid, parent_pid

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.pid is not None and self.owner == os.getpid():
            self.dead.append(self.pid)
        self.sock, self.pid, self.owner = None, None, None
        self._reap_dead()

    def _reap_dead(self) -> None:
        for pid in list(self.dead):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except ChildProcessError:
                pass
            self.dead.remove(pid)

    def ensure(self) -> None:
        with self.lock:
            self._ensure()

    def _ensure(self) -> None:
        if self.sock is not None and self.owner == os.getpid():
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                    return  # alive
            except ChildProcessError:
                pass  # reaped by someone else: dead too
            self.sock.close()
            self.sock = None
        self._reap_dead()
        self._start()

    def send(self, msg: tuple, fds: Sequence[int] = (), restart: bool = False) -> None:
        data = _frame(msg)
        with self.lock:
            for attempt in (0, 1):
                if restart or attempt:
                    self._ensure()
                elif self.sock is None or self.owner != os.getpid():
                    raise BrokenPipeError("no watchdog")
                try:
                    if fds:
                        sent = socket.send_fds(self.sock, [data], list(fds))
                        if sent < len(data):
                            self.sock.sendall(data[sent:])
                    else:
                        self.sock.sendall(data)
                    return
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    # W died (or is wedged: it reads its socket within ms when alive; then it is
                    # killed). A spawn may start a new one; a term/kill is moot.
                    if self.pid is not None and self.owner == os.getpid():
                        try:
                            os.kill(self.pid, signal.SIGKILL)
                        except OSError:
                            pass
                    self._drop()
                    if not restart or attempt:
                        raise

    def shutdown(self, timeout_s: float = 5.0) -> None:
        # Bounded: at exit, a thread stuck mid-send (W stopped?) must not keep heidi alive.
        locked = self.lock.acquire(timeout=min(1.0, timeout_s))
        try:
            pid = self.pid if self.owner == os.getpid() else None
            if self.sock is not None:
                self.sock.close()
            self.sock, self.pid, self.owner = None, None, None
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
# An orderly exit reaps W (which checks that no stage is left) instead of leaving it to init.
atexit.register(_client.shutdown, 0.5)
_sids = itertools.count(1)


def ensure_started() -> int:
    """Fork the watchdog now (a daemon may call this before it starts threads). Returns its pid."""
    _client.ensure()
    return _client.pid or 0


def watchdog_pid() -> int | None:
    return _client.pid if _client.owner == os.getpid() else None


def shutdown(timeout_s: float = 5.0) -> None:
    """Close the lifeline and reap the watchdog (it kills any stage still running). For tests
    and orderly exits; a process that just exits gets the same effect."""
    _client.shutdown(timeout_s)


def request_term(sid: int) -> bool:
    try:
        _client.send(("term", sid))
        return True
    except OSError:
        return False


def kill_watchdog() -> None:
    """W did not report long after it should have: take it down (it is our child), so that the
    status pipe ends and the caller falls back to killing the stage by its token."""
    pid = watchdog_pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def request_kill(sid: int) -> bool:
    try:
        _client.send(("kill", sid))
        return True
    except OSError:
        return False


class Launch:
    """A stage handed to the watchdog: the supervisor reads out_fd and status_fd."""

    __slots__ = ("sid", "token", "out_fd", "status_fd", "t0", "error")

    def __init__(self, sid: int, token: str, out_fd: int, status_fd: int, t0: float,
                 error: str | None = None):
        self.sid, self.token, self.out_fd, self.status_fd = sid, token, out_fd, status_fd
        self.t0, self.error = t0, error

    def close(self) -> None:
        for fd in (self.out_fd, self.status_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.status_fd = -1


def check_args(timeout_s, grace_s, check_interval_s) -> None:
    if timeout_s is not None and not timeout_s >= 0:
        raise ValueError(f"timeout_s must be None or >= 0, got {timeout_s!r}")
    if not grace_s >= 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
    if not check_interval_s > 0:
        raise ValueError(f"check_interval_s must be > 0, got {check_interval_s!r}")


def _encode_env(env: Mapping[str, str] | None, token: str) -> dict[bytes, bytes]:
    if env is None:
        # Already bytes and well-formed; copying the dict under os.environb is ~50x faster than
        # iterating the mapping, and this runs once per stage spawn.
        data = getattr(os.environb, "_data", None)
        out = data.copy() if type(data) is dict else dict(os.environb)
    else:
        fsencode = os.fsencode
        out = {fsencode(key): fsencode(value) for key, value in env.items()}
        # Checked here, not in W, so that a bad entry is the caller's ValueError.
        keys = b"".join(out)
        if b"=" in keys or b"\0" in keys or b"" in out or b"\0" in b"".join(out.values()):
            bad = next(k for k, v in env.items()
                       if not k or "=" in k or "\0" in k or "\0" in v)
            raise ValueError(f"invalid environment variable for a stage: {bad!r}")
    out[TOKEN_ENV.encode()] = token.encode()
    return out


def launch(argv: Sequence[str], cwd: str | None, env: Mapping[str, str] | None,
           rlimits: Mapping[int, tuple[int, int]] | None, grace_s: float) -> Launch:
    """Validate, hand the stage to the watchdog, return the pipes to watch. Raises only for
    caller errors (bad argv/env types or values); OS failures come back as Launch.error."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("argv must be a non-empty sequence of arguments")
    argv_b = [os.fsencode(a) for a in argv]
    if any(b"\0" in a for a in argv_b):
        raise ValueError("argv contains a NUL byte")
    token = os.urandom(16).hex()
    env_b = _encode_env(env, token)
    limits = [(int(res), int(soft), int(hard)) for res, (soft, hard) in (rlimits or {}).items()]
    t0 = time.monotonic()
    sid = next(_sids)
    try:
        cwd_b = os.fsencode(os.path.abspath(cwd) if cwd is not None else os.getcwd())
    except OSError as exc:
        return Launch(sid, token, -1, -1, t0,
                      f"cannot determine the working directory: {_strerror(exc.errno)}")
    if b"\0" in cwd_b:
        raise ValueError("cwd contains a NUL byte")
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    try:
        _client.send(("spawn", sid, argv_b, env_b, cwd_b, limits, float(grace_s), token),
                     (out_w, st_w), restart=True)
    except OSError as exc:
        os.close(out_r)
        os.close(st_r)
        return Launch(sid, token, -1, -1, t0, f"cannot start the heidi watchdog process: {exc}")
    finally:
        os.close(out_w)
        os.close(st_w)
    return Launch(sid, token, out_r, st_r, t0)


def grow_pipe(fd: int) -> None:
    """A stage filled its output pipe: give it 1 MiB, so a chatty stage costs fewer wakeups
    (done lazily: most stages never fill 64 KiB, and the resize is not free)."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep 64 KiB


class StatusReader:
    """Collects the watchdog's single status frame from the status pipe."""

    __slots__ = ("buf", "final")

    def __init__(self) -> None:
        self.buf = b""
        self.final: tuple | None = None

    def settle(self, fd: int) -> None:
        """Output ended before the status was read: W writes the status first, so it is in the
        pipe unless W died; read what is there."""
        while self.final is None and select.select([fd], [], [], 0.1)[0]:
            data = os.read(fd, 4096)
            if not data:
                return
            self.feed(data)

    def feed(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 4:
            (size,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) >= 4 + size:
                self.final = marshal.loads(self.buf[4:4 + size])
                self.buf = b""


def build_result(launch: Launch, reader: StatusReader, *, timed_out: bool,
                 timeout_s: float | None, stopped: bool, output_bytes: int) -> StageResult:
    wall_ms = (time.monotonic() - launch.t0) * 1000.0
    final = reader.final
    pid = exit_code = sig = None
    spawn_error = launch.error
    maxrss, utime, stime = 0, 0.0, 0.0
    if spawn_error is None and final is None:
        # W died under us: make sure nothing of the stage survives it, then say so.
        kill_by_token(launch.token)
        spawn_error = "stage supervision lost: the heidi watchdog process ended unexpectedly"
    elif final is not None and final[0] == "failed":
        spawn_error = final[1]
    elif final is not None:
        _, pid, status, maxrss, utime, stime = final
        if status is not None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            elif os.WIFEXITED(status):
                exit_code = os.WEXITSTATUS(status)
    if spawn_error is not None:
        timed_out = stopped = False
    return StageResult(pid=pid, exit_code=exit_code, signal=sig, timed_out=timed_out,
                       timeout_s=timeout_s if timed_out else None, stopped=stopped,
                       spawn_error=spawn_error, output_bytes=output_bytes, wall_ms=wall_ms,
                       peak_rss_kb=int(maxrss), cpu_user_s=float(utime), cpu_sys_s=float(stime))


def abort(launch: Launch, reader: StatusReader, status_open: bool, grace_s: float) -> None:
    """The caller's callback raised: terminate the stage (SIGTERM, grace, SIGKILL) and wait for
    it to be gone, draining its output unread. Another exception meanwhile escalates to SIGKILL;
    either way W finishes the job even if we stop waiting."""
    if reader.final is not None or not status_open or launch.status_fd < 0:
        return
    try:
        if request_term(launch.sid):
            poller = select.poll()
            poller.register(launch.status_fd, select.POLLIN)
            if launch.out_fd >= 0:
                poller.register(launch.out_fd, select.POLLIN)
            give_up = time.monotonic() + grace_s + W_SILENT_S
            while reader.final is None and time.monotonic() < give_up:
                for fd, _ in poller.poll(1000):
                    data = os.read(fd, 1 << 16)
                    if fd == launch.status_fd:
                        if not data:
                            break  # W died: fall back below
                        reader.feed(data)
                    elif not data:
                        poller.unregister(fd)
                else:
                    continue
                break
        if reader.final is None:
            kill_watchdog()
            kill_by_token(launch.token)
    except BaseException:
        request_kill(launch.sid)
        raise
