"""One stage from spawn to result, shared by `_supervise_py` and `_supervise_c`.

The twins differ in how they spawn (the compiled one calls posix_spawn from C, with the GIL
released; the pure one uses subprocess) and in their wait loop (poll + read in C without the GIL,
or select.poll + readv); everything else -- validating a request, finding the program, the
registry slot the watchdog reads, reaping, finding and killing what a stage left behind, the
result -- is here, once.

A stage's processes: its main process, everything in its process group or session, and, since
the supervising process is a child subreaper, the orphans it adopts that carry the stage's
HEIDI_STAGE_TOKEN -- or any child it gains after the stage started, while this is its only
stage -- with all their descendants. (So a program that runs stages should not start child
processes of its own while a single stage runs: they could not be told from a daemon the stage
left behind.)
"""
from __future__ import annotations

import errno as _errno
import itertools
import math
import os
import resource
import select
import signal
import stat
import time
from collections.abc import Callable, Mapping, Sequence

from . import _supervise_cgroup as _cg
from . import _supervise_watchdog as _wd
from ._supervise_types import StageResult, make_result

__all__ = ("DRAIN_S", "GIVE_UP_S", "PIPE_DEFAULT_SIZE", "PIPE_SIZE", "Stage", "TOKEN_ENV",
           "USE_PIDFD", "check_args", "grow_pipe")

TOKEN_ENV = _wd.TOKEN_ENV
GIVE_UP_S = _wd.GIVE_UP_S
# After the stage is over, output still in the pipe is read; a writer that somehow escaped (it
# passed its stdout to an unrelated process) cannot keep the supervisor waiting beyond this.
DRAIN_S = 2.0
# Whether to wait on pidfds (tests turn it off to exercise the polling of kernels before 5.3).
USE_PIDFD = True
PIPE_SIZE = 1 << 20
# A read this large means the pipe (64 KiB by default) was full: time to grow it to PIPE_SIZE.
PIPE_DEFAULT_SIZE = 1 << 16
# How often a running stage's supervisor makes sure the watchdog is alive.
WATCHDOG_CHECK_S = 1.0
# Leftovers are not children the supervisor can wait on: how often to look at them again.
LEFTOVER_CHECK_S = 0.05
KILL_CHECK_S = 0.02
# Without a pidfd, the main process is polled: first soon, then less often.
NO_PIDFD_FIRST_S, NO_PIDFD_MAX_S = 0.0005, 0.05

_F_SETPIPE_SZ = 1031
_RLIMIT_NAMES = {getattr(resource, n): n for n in sorted(dir(resource), reverse=True)
                 if n.startswith("RLIMIT_") and n != "RLIMIT_OFILE"}  # the BSD alias of NOFILE
_TOKEN_KEY = TOKEN_ENV.encode()
_RUNNING, _TERM, _KILL = 0, 1, 2

Spawn = Callable[[bytes, list, dict, "bytes | None", int], int]
# spawn_cg(path, argv, env, cwd, out_w, procs_fd) -> pid: the new process writes itself into the
# stage's cgroup (procs_fd) before it execs; OSError with filename CGROUP_PROCS if that failed.
SpawnCg = Callable[[bytes, list, dict, "bytes | None", int, int], int]
CGROUP_PROCS = "cgroup.procs"
# How long ending a stage waits for its cgroup to empty after cgroup.kill before leaving it.
CGROUP_EMPTY_S = 1.0


_token_prefix = ""
_token_count = itertools.count(1)  # next() on it is atomic: threads never share a token


def _new_token() -> str:
    """32 hex digits, unique on this machine for a good while: a random prefix per process
    (new after a fork) and a counter. Not a secret -- it only marks a stage's processes."""
    global _token_prefix
    if not _token_prefix:
        _token_prefix = os.urandom(12).hex()
    return f"{_token_prefix}{next(_token_count) & 0xFFFFFFFF:08x}"


def _forget_token_prefix() -> None:
    global _token_prefix
    _token_prefix = ""


os.register_at_fork(after_in_child=_forget_token_prefix)


def _strerror(number: int | None) -> str:
    return os.strerror(number) if number else "unknown error"


def check_args(timeout_s: float | None, grace_s: float, check_interval_s: float) -> None:
    if timeout_s is not None and not timeout_s >= 0:
        raise ValueError(f"timeout_s must be None or >= 0, got {timeout_s!r}")
    if not grace_s >= 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
    if not check_interval_s > 0:
        raise ValueError(f"check_interval_s must be > 0, got {check_interval_s!r}")


def _encode_env(env: Mapping[str, str] | None) -> dict[bytes, bytes]:
    if env is None:
        # Already bytes and well-formed; copying the dict under os.environb is ~50x faster than
        # iterating the mapping, and this runs once per stage spawn.
        data = getattr(os.environb, "_data", None)
        return data.copy() if type(data) is dict else dict(os.environb)
    fsencode = os.fsencode
    out = {fsencode(key): fsencode(value) for key, value in env.items()}
    keys = b"".join(out)
    if b"=" in keys or b"\0" in keys or b"" in out or b"\0" in b"".join(out.values()):
        bad = next(k for k, v in env.items() if not k or "=" in k or "\0" in k or "\0" in v)
        raise ValueError(f"invalid environment variable for a stage: {bad!r}")
    return out


def grow_pipe(fd: int) -> None:
    """A stage filled its output pipe: give it 1 MiB, so a chatty stage costs fewer wakeups
    (done lazily: most stages never fill 64 KiB, and the resize is not free)."""
    try:
        import fcntl
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep 64 KiB


def _resolve(name: bytes, env: Mapping[bytes, bytes], cwd: bytes | None) -> tuple[bytes | None, int]:
    """execvp's search, done before spawning (a failed spawn costs as much as a good one):
    (the path to execute, 0) or (None, errno)."""
    if b"/" in name:
        return name, 0
    saved = 0
    for directory in env.get(b"PATH", os.fsencode(os.defpath)).split(b":"):
        path = os.path.join(directory or b".", name)
        probe = path if path.startswith(b"/") or cwd is None else os.path.join(cwd, path)
        try:
            st = os.stat(probe)
        except OSError as exc:
            # ENOENT/ENOTDIR: try the next entry; anything else (EACCES...) is the one worth
            # reporting if nothing works.
            if exc.errno not in (_errno.ENOENT, _errno.ENOTDIR) and not saved:
                saved = exc.errno or 0
            continue
        if stat.S_ISREG(st.st_mode) and os.access(probe, os.X_OK):
            return path, 0
        saved = saved or _errno.EACCES
    return None, saved or _errno.ENOENT


def _fork_exec(path: bytes, argv: list, env: dict, cwd: bytes | None, out_w: int,
               rlimits: list, procs_fd: int = -1) -> tuple[int | None, str | None]:
    """The slow path, for rlimits (posix_spawn cannot set them, and heidi must keep its own),
    and for the pure twin's stages in a cgroup (procs_fd: the child moves itself in first)."""
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"exec:0:"
        try:
            if procs_fd >= 0:
                try:
                    os.write(procs_fd, b"0")
                except OSError as exc:
                    message = f"cgroup:{exc.errno}:".encode()
                    raise
            os.setsid()
            for sig in _wd.SIGNALS_TO_DEFAULT:
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if cwd is not None:
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    message = f"chdir:{exc.errno}:".encode()
                    raise
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 1 << 20)
            for res, soft, hard in rlimits:
                try:
                    resource.setrlimit(res, (soft, hard))
                except (OSError, ValueError) as exc:
                    num = getattr(exc, "errno", None) or _errno.EINVAL
                    message = f"rlimit:{num}:{res},{soft},{hard}".encode()
                    raise
            try:
                os.execve(path, argv, env)
            except OSError as exc:
                message = f"exec:{exc.errno}:".encode()
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
    if what == "cgroup":
        return None, CGROUP_PROCS
    if what == "rlimit":
        res, soft, hard = (int(x) for x in extra.split(","))
        name = _RLIMIT_NAMES.get(res, f"resource {res}")
        return None, f"cannot set {name} to ({soft}, {hard}): {_strerror(int(num))}"
    if what == "chdir":
        return None, (f"cannot change directory to {os.fsdecode(cwd or b'')!r}: "
                      f"{_strerror(int(num))}")
    return None, f"cannot execute {os.fsdecode(argv[0])!r}: {_strerror(int(num))}"


class Stage:
    """One stage's processes, from spawn until none is left. The wait loop reads `out_fd`,
    watches `pidfd`, and calls on_wake() when the pidfd fires or `wake_at` has come."""

    # Defaults, read through the class until set: a stage is built per spawn, and most of these
    # never change for a stage that simply ends.
    tick = me = 0
    subreaper = reaped = finished = live = no_pidfd = False
    error: str | None = None
    pid: int | None = None
    pidfd = out_fd = hold_fd = slot = -1
    registry: _wd.Registry | None = None
    cgroup: _cg.StageCgroup | None = None
    cg_usage: tuple[int, int, int | None] | None = None
    status: int | None = None
    rusage = (0, 0.0, 0.0)
    phase = _RUNNING
    kill_at = wake_at = math.inf
    backoff = NO_PIDFD_FIRST_S
    _needle = b""

    def __init__(self, argv: Sequence[str], cwd: str | None, env: Mapping[str, str] | None,
                 rlimits: Mapping[int, tuple[int, int]] | None, grace_s: float):
        """Validates the request: ValueError for a caller's mistake (bad argv, env, cwd)."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise ValueError("argv must be a non-empty sequence of arguments")
        self.argv = argv_b = [os.fsencode(a) for a in argv]
        for arg in argv_b:
            if b"\0" in arg:
                raise ValueError("argv contains a NUL byte")
        self.env = _encode_env(env)
        self.token = token = _new_token()
        self.env[_TOKEN_KEY] = token.encode()
        self.cwd: bytes | None = None
        if cwd is not None:
            self.cwd = os.fsencode(os.path.abspath(cwd))
            if b"\0" in self.cwd:
                raise ValueError("cwd contains a NUL byte")
        self.rlimits = [(int(res), int(soft), int(hard))
                        for res, (soft, hard) in rlimits.items()] if rlimits else None
        self.grace_s = float(grace_s)
        self.t0 = time.monotonic()
        self.next_watch = self.t0 + WATCHDOG_CHECK_S

    # -- start

    def start(self, spawn: Spawn, spawn_cg: SpawnCg | None = None) -> None:
        """Spawn the stage (spawn(path, argv, env, cwd, out_w) -> pid, or OSError); where this
        process has cgroups, into a cgroup of its own (spawn_cg, or the fork path without
        one). A stage that cannot start leaves `error` set and nothing running."""
        try:
            registry = _wd.registry()
        except OSError as exc:
            self.error = f"cannot start the heidi watchdog process: {exc}"
            return
        if self.cwd is not None:
            try:
                if not stat.S_ISDIR(os.stat(self.cwd).st_mode):
                    raise NotADirectoryError(_errno.ENOTDIR, "")
                if not os.access(self.cwd, os.X_OK):
                    raise PermissionError(_errno.EACCES, "")
            except OSError as exc:
                self.error = (f"cannot change directory to {os.fsdecode(self.cwd)!r}: "
                              f"{_strerror(exc.errno)}")
                return
        path, number = _resolve(self.argv[0], self.env, self.cwd)
        if path is None:
            self.error = f"cannot execute {os.fsdecode(self.argv[0])!r}: {_strerror(number)}"
            return
        where = _cg.containment()
        slot = registry.acquire(self, self.token, where.parent)
        if slot < 0:
            self.error = f"cannot start a stage: {_wd.SLOTS} stages are running already"
            return
        self.registry = registry
        self.me, self.subreaper = _wd.owner(), _wd.subreaper()
        self.tick = _wd.start_tick()
        self.t0 = time.monotonic()
        out_r, out_w = os.pipe()
        pid = None
        try:
            if where.parent is not None:
                self.cgroup = _cg.StageCgroup.create(where, self.token)
                if self.cgroup is None:
                    registry.no_cgroup(slot)
                else:
                    pid = self._spawn_in_cgroup(path, out_w, spawn_cg)
                    if pid is None and self.error == CGROUP_PROCS:
                        # Not allowed into the cgroup after all: as if there were none.
                        self.error = None
                        self.cgroup.remove(0.0)
                        self.cgroup = None
                        registry.no_cgroup(slot)
                        _cg.disable(f"cannot move a process into a cgroup under {where.parent}")
            if self.cgroup is None:
                pid = self._spawn(path, out_w, spawn)
        except BaseException:
            os.close(out_r)
            os.close(out_w)
            self._drop_cgroup()
            registry.release(slot)
            raise
        if pid is None:
            os.close(out_r)
            os.close(out_w)
            self._drop_cgroup()
            registry.release(slot)
            self.error = self.error or f"cannot execute {os.fsdecode(self.argv[0])!r}"
            return
        registry.running(slot, pid, self.tick)
        if self.cgroup is not None:
            self.cgroup.spawned()
        else:
            _wd.wake(self.tick)  # (after running(): W's first look must see this stage)
        self.pid, self.out_fd, self.slot, self.live = pid, out_r, slot, True
        if USE_PIDFD:
            try:
                self.pidfd = os.pidfd_open(pid)
            except (AttributeError, OSError):
                pass  # Linux < 5.3: poll for the main process instead
        if self.pidfd >= 0:
            # This process keeps the pipe's write end until the main process is reaped: the
            # output then cannot end before the pidfd fires, and a stage's end is one wakeup,
            # not two (the end of output, then the exit a moment later).
            self.hold_fd = out_w
            self.wake_at = self.next_watch
        else:
            os.close(out_w)
            self.no_pidfd = True
            self.wake_at = self.t0 + self.backoff

    def _spawn(self, path: bytes, out_w: int, spawn: Spawn) -> int | None:
        if self.rlimits:
            pid, self.error = _fork_exec(path, self.argv, self.env, self.cwd, out_w, self.rlimits)
            return pid
        try:
            return spawn(path, self.argv, self.env, self.cwd, out_w)
        except OSError as exc:
            if exc.errno == _errno.ENOSYS:  # no posix_spawn chdir in this C library
                pid, self.error = _fork_exec(path, self.argv, self.env, self.cwd, out_w, [])
                return pid
            self.error = f"cannot execute {os.fsdecode(self.argv[0])!r}: {_strerror(exc.errno)}"
            return None

    def _spawn_in_cgroup(self, path: bytes, out_w: int, spawn_cg: SpawnCg | None) -> int | None:
        """The new process enters the cgroup before it execs: nothing of the stage ever runs
        outside it. On a refusal to enter, error is CGROUP_PROCS."""
        assert self.cgroup is not None
        procs_fd = self.cgroup.procs_fd
        if self.rlimits or spawn_cg is None:
            pid, self.error = _fork_exec(path, self.argv, self.env, self.cwd, out_w,
                                         self.rlimits or [], procs_fd)
            return pid
        try:
            return spawn_cg(path, self.argv, self.env, self.cwd, out_w, procs_fd)
        except OSError as exc:
            if exc.filename == CGROUP_PROCS:
                self.error = CGROUP_PROCS
            elif exc.filename is not None and self.cwd is not None:  # the chdir failed
                self.error = (f"cannot change directory to {os.fsdecode(self.cwd)!r}: "
                              f"{_strerror(exc.errno)}")
            else:
                self.error = (f"cannot execute {os.fsdecode(self.argv[0])!r}: "
                              f"{_strerror(exc.errno)}")
            return None

    def _drop_cgroup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove(CGROUP_EMPTY_S)
            self.cgroup = None

    # -- the wait loop's calls

    def close_output(self) -> None:
        if self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1

    def on_wake(self, now: float) -> None:
        """The pidfd fired, the output ended, or wake_at came: reap, look for leftovers,
        escalate."""
        if now >= self.next_watch:
            self.next_watch = now + WATCHDOG_CHECK_S
            try:
                _wd.ensure_started()  # W died (someone killed it): start another
            except OSError:
                pass
        if not self.reaped:
            self._reap()
        if self.phase == _RUNNING:
            if not self.reaped:
                self._wait_main(now, math.inf)
                return
            # The main process ended by itself: whatever it left behind goes too.
            if self._surely_clear():
                self._finish()
                return
            members = self._members()
            if not members:
                self._finish()
                return
            self._term(now, members)
            return
        if self.phase == _TERM:
            if now < self.kill_at:
                if self.reaped:
                    if self._surely_clear() or not self._members():
                        self._finish()
                        return
                    self.wake_at = min(self.kill_at, now + LEFTOVER_CHECK_S)
                else:
                    self._wait_main(now, self.kill_at)
                return
            self.phase = _KILL
        members = self._members()
        if self.reaped and not members:
            self._finish()
        elif now >= self.kill_at + GIVE_UP_S:
            self._finish()  # unkillable (stuck in the kernel): report what we have
        else:
            self._signal(members, signal.SIGKILL)
            self.wake_at = now + KILL_CHECK_S

    def reaped_by_loop(self, status: int, maxrss: int, utime: float, stime: float,
                       clear: bool, now: float) -> None:
        """A compiled wait loop reaped the main process itself (and looked at this process's
        children: clear means none but the watchdog). Same outcome as on_wake()."""
        self._reaped(status, (maxrss, utime, stime))
        if clear:
            self._finish()
        else:
            self.on_wake(now)

    def terminate(self, now: float) -> None:
        """Timeout or stop: SIGTERM to every process of the stage, SIGKILL grace_s later."""
        if self.phase == _RUNNING and not self.finished:
            self._term(now, self._members())

    def abort(self) -> None:
        """The caller's callback (or ^C) interrupts the wait: end the stage now -- SIGTERM,
        grace, SIGKILL -- and wait until it is gone, draining its output unread. Another
        exception meanwhile escalates to SIGKILL."""
        if self.finished or self.pid is None:
            return
        try:
            self.terminate(time.monotonic())
            poller = select.poll()
            if self.out_fd >= 0:
                poller.register(self.out_fd, select.POLLIN)
            watched = -1
            while not self.finished:
                if self.pidfd != watched:
                    if watched >= 0:
                        poller.unregister(watched)
                    if self.pidfd >= 0:
                        poller.register(self.pidfd, select.POLLIN)
                    watched = self.pidfd
                now = time.monotonic()
                for fd, _ in poller.poll(max(0, math.ceil((self.wake_at - now) * 1000))):
                    if fd == self.out_fd and not os.read(fd, 1 << 16):
                        poller.unregister(fd)
                        self.close_output()
                self.on_wake(time.monotonic())
        except BaseException:
            self._kill_now()
            raise

    def close(self) -> None:
        """After the wait (also after an exception): the fds. A finished stage has released its
        slot; one that is not keeps it, for the watchdog."""
        self.close_output()
        self._close_fds()

    def result(self, timed_out: bool, timeout_s: float | None, stopped: bool,
               output_bytes: int) -> StageResult:
        wall_ms = (time.monotonic() - self.t0) * 1000.0
        exit_code = sig = None
        if self.status is not None:
            if os.WIFSIGNALED(self.status):
                sig = os.WTERMSIG(self.status)
            elif os.WIFEXITED(self.status):
                exit_code = os.WEXITSTATUS(self.status)
        if self.error is not None:
            timed_out = stopped = False
        maxrss, utime, stime = self.rusage
        cpu_source = memory_source = "rusage"
        if self.cg_usage is not None:
            # The whole stage tree, daemons and unreaped grandchildren included.
            user_us, sys_us, peak = self.cg_usage
            utime, stime, cpu_source = user_us / 1e6, sys_us / 1e6, "cgroup"
            if peak is not None:
                maxrss, memory_source = peak // 1024, "cgroup"
        return make_result(self.pid, exit_code, sig, timed_out,
                           timeout_s if timed_out else None, stopped, self.error, output_bytes,
                           wall_ms, int(maxrss), float(utime), float(stime), cpu_source,
                           memory_source)

    # -- inside

    @property
    def needle(self) -> bytes:
        if not self._needle:
            self._needle = _wd.token_needle(self.token)
        return self._needle

    def _wait_main(self, now: float, limit: float) -> None:
        if self.pidfd >= 0:
            self.wake_at = min(limit, self.next_watch)
        else:
            self.backoff = min(self.backoff * 2, NO_PIDFD_MAX_S)
            self.wake_at = min(limit, now + self.backoff)

    def _reap(self) -> None:
        main = self.pid
        assert main is not None  # only a spawned stage is reaped
        status: int | None
        while True:
            try:
                pid, status, ru = os.wait4(main, os.WNOHANG)
            except InterruptedError:
                continue
            except ChildProcessError:
                # Reaped by someone else (SIGCHLD ignored, a waitpid(-1) elsewhere): the status
                # is lost, but the process is gone.
                pid, status, ru = main, None, None
            break
        if pid != 0:
            self._reaped(status, None if ru is None else (ru.ru_maxrss, ru.ru_utime, ru.ru_stime))

    def _reaped(self, status: int | None, rusage: tuple[int, float, float] | None) -> None:
        self.reaped, self.live, self.status = True, False, status
        if rusage is not None:
            self.rusage = rusage
        self._close_fds()

    def _others(self) -> tuple[set[int], bool]:
        """The other running stages' main pids (with the watchdog's), and whether this stage is
        the only one."""
        assert self.registry is not None  # set with the slot, before the spawn
        others = self.registry.others(self)
        skip = {s.pid for s in others if s.pid is not None and not s.reaped}
        watchdog = _wd.current_watchdog()
        if watchdog is not None:
            skip.add(watchdog)
        return skip, not others

    def _adopted_is_ours(self, pid: int, info: tuple[bytes, int, int, int, int], alone: bool) -> bool:
        state, _, pgid, sid, tick = info
        if self.pid in (pgid, sid) or (alone and tick >= self.tick):
            return True
        return state != b"Z" and _wd.has_token(pid, self.needle)

    def _surely_clear(self) -> bool:
        """After the main process ended: True when nothing of the stage can be left, told from
        this process's own children alone (being a subreaper, it has adopted every orphan).
        False means: look properly (_members)."""
        if not self.subreaper or (self.cgroup is not None and self.cgroup.populated()):
            return False
        me = self.me
        children = _wd.children_of(me)
        if children is None:
            return False
        skip = None
        watchdog = _wd.current_watchdog()
        for pid in children:
            if pid == watchdog:
                continue
            if skip is None:
                skip, alone = self._others()
            if pid in skip:
                continue
            info = _wd.proc_stat(pid)
            if info is None or info[1] != me or not self._adopted_is_ours(pid, info, alone):
                continue
            if info[0] != b"Z":
                return False
            _reap_orphan(pid)
        return True

    def _members(self) -> list[tuple[int, int]]:
        """(pid, pgid) of the stage's live processes other than an unreaped main process.
        Zombies among them that this process adopted are reaped on the way."""
        procs = _wd.scan_procs()
        me = self.me
        main = self.pid
        skip, alone = self._others()
        skip.add(me)
        subreaper = self.subreaper
        roots = [] if self.reaped or main is None else [main]
        for pid, info in procs.items():
            if pid == main or pid in skip:
                continue
            _, ppid, pgid, sid, _ = info
            if main in (pgid, sid):
                roots.append(pid)
            elif ppid == me and subreaper:
                if self._adopted_is_ours(pid, info, alone):
                    roots.append(pid)
            elif not subreaper and _wd.has_token(pid, self.needle):
                roots.append(pid)  # no subreaper here: escaped processes are anywhere
        if self.cgroup is not None:
            roots.extend(pid for pid in self.cgroup.pids() if pid in procs and pid not in skip)
        members = []
        for pid in _wd.descendants(procs, roots, skip):
            if pid == main and not self.reaped:
                continue
            if procs[pid][0] == b"Z":
                if procs[pid][1] == me:
                    _reap_orphan(pid)
                continue
            members.append((pid, procs[pid][2]))
        return members

    def _signal(self, members: list[tuple[int, int]], sig: int) -> None:
        if sig == signal.SIGKILL and self.cgroup is not None:
            self.cgroup.kill()  # everything in it, whatever it did to its session or env
        group = not self.reaped  # the group id is the stage's only while the main is unreaped
        if group and self.pid is not None:
            try:
                os.killpg(self.pid, sig)
            except OSError:
                pass
        for pid, pgid in members:
            if group and pgid == self.pid and sig != signal.SIGKILL:
                continue  # got it through the group; a second SIGTERM may run a handler twice
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def _term(self, now: float, members: list[tuple[int, int]]) -> None:
        self.phase, self.live = _TERM, False
        self.kill_at = now + self.grace_s
        self._signal(members, signal.SIGTERM)
        # A stopped process (^Z, SIGSTOP) would hold SIGTERM pending until the SIGKILL.
        self._signal(members, signal.SIGCONT)
        if self.reaped:
            self.wake_at = min(self.kill_at, now + LEFTOVER_CHECK_S)
        else:
            self.backoff = NO_PIDFD_FIRST_S
            self._wait_main(now, self.kill_at)

    def _kill_now(self) -> None:
        """Second interruption: SIGKILL everything now, wait briefly for the main process."""
        try:
            self.phase = _KILL
            self._signal(self._members(), signal.SIGKILL)
            give_up = time.monotonic() + 1.0
            while not self.reaped and time.monotonic() < give_up:
                self._reap()
                time.sleep(0.005)
            if self.reaped:
                self._finish()
        except BaseException:  # noqa: BLE001 - already on the way out with the first exception
            pass

    def _finish(self) -> None:
        self.finished, self.live = True, False
        self._close_fds()  # (still open if we gave up on an unkillable main process)
        cgroup = self.cgroup
        if cgroup is not None:
            # Nothing of the stage is left that heidi can see; the cgroup says so for the
            # rest (a process that escaped heidi's view dies here). Its usage first: the
            # directory's counters go with it.
            usage = cgroup.usage()
            if cgroup.remove(0.0):  # (an rmdir: the common case, an empty cgroup)
                self.cg_usage, self.cgroup = usage, None
            else:
                cgroup.kill()
                gone = cgroup.remove(CGROUP_EMPTY_S)
                self.cg_usage = cgroup.usage() or usage if not gone else usage
                if gone:
                    self.cgroup = None
        self._release()

    def _close_fds(self) -> None:
        """The main process is reaped (or given up on): its pidfd, and our end of its pipe."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1

    def _release(self) -> None:
        if self.slot >= 0:
            assert self.registry is not None  # set with the slot
            self.registry.release(self.slot)
            self.slot = -1


def _reap_orphan(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except OSError:
        pass
