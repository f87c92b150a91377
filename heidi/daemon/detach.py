"""`heidi daemon --detach`: the double fork, the daemon's stdio on its log file, and the pipe on
which the daemon tells the waiting parent "ok <pid> <url>" or "err <code> <line>"."""
from __future__ import annotations

import os
import select
import sys
import time
import traceback

from ..config import Config
from ..errors import ConfigError, HeidiError, RunLocked, one_line
from .service import Daemon

DETACH_READY_TIMEOUT_S = 120.0


def daemonize(config: Config, mode: str | None, pid_file: str, log_file: str) -> int:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child > 0:  # the parent: wait for the first child, then for the daemon's word
        os.close(write_fd)
        os.waitpid(child, 0)
        return _await_daemon(read_fd, log_file)
    code = 1
    try:
        os.close(read_fd)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)  # the first child: the daemon is reparented, never a session leader
        code = _daemon_child(config, mode, pid_file, log_file, write_fd)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _daemon_child(config: Config, mode: str | None, pid_file: str, log_file: str,
                  write_fd: int) -> int:
    told = False

    def tell(text: str) -> None:
        nonlocal told
        if told:
            return
        told = True
        try:
            os.write(write_fd, (text.replace("\n", " ")[:1000] + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
        try:
            os.close(write_fd)
        except OSError:
            pass

    try:
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        parent = os.path.dirname(log_file)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError as exc:
        tell(f"err 1 cannot open the log file {log_file}: {exc.strerror or exc}")
        return 1
    daemon = Daemon(config, mode, pid_file=pid_file, log_file=log_file,
                    on_ready=lambda pid, url: tell(f"ok {pid} {url}"))
    try:
        return daemon.serve()
    except HeidiError as exc:
        code = 75 if isinstance(exc, RunLocked) else exc.exit_code
        daemon.log(f"heidi: {one_line(exc)}")
        tell(f"err {code} {one_line(exc)}")
        return code
    except BaseException as exc:
        daemon.log(f"heidi: {one_line(exc)}")
        daemon.log("".join(traceback.format_exception(exc)).rstrip())
        tell(f"err 1 {one_line(exc)}")
        return 1
    finally:
        tell(f"err 1 the daemon exited; see {log_file}")


def _await_daemon(read_fd: int, log_file: str) -> int:
    """Parent of --detach: 0 once the daemon listens, else its one-line error as a HeidiError."""
    data = b""
    deadline = time.monotonic() + DETACH_READY_TIMEOUT_S
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HeidiError(f"the daemon did not report within {DETACH_READY_TIMEOUT_S:g} s; "
                                 f"see {log_file}")
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    kind, _, rest = line.partition(" ")
    if kind == "ok":
        pid, _, url = rest.partition(" ")
        print(f"heidi daemon listening on {url} (pid {pid})", file=sys.stderr)
        return 0
    if kind == "err":
        code_text, _, message = rest.partition(" ")
        code = int(code_text) if code_text.isdigit() else 1
        if code == 75:
            raise RunLocked(message)
        err = ConfigError(message) if code == 2 else HeidiError(message)
        err.exit_code = code
        raise err
    raise HeidiError(f"the daemon exited during start-up; see {log_file}")
