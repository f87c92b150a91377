"""The daemon's life in one process: the loop thread (the only one that touches the Machine), the
HTTP threads, the signals (SIGTERM/SIGINT, and SIGHUP in the foreground, end the process but not
the run: the stage ends, the run stays interrupted; SIGHUP reopens a detached daemon's log),
daemon.json."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import orjson

from .. import control
from .._version import __version__
from ..config import Config
from ..core import completed_run, held_run_state, status as core_status
from ..errors import HeidiError, RefusedError, StateError, one_line
from ..interrupt import Interrupt, Interrupted
from ..limits import apply_limits
from ..loop import STATES, judge_action
from ..machine import Machine
from ..status import status_view
from ..waiting import DiskWait, is_disk_full
from .api import Server, make_server, url
from .auth import Auth, check_bind
from .pidfile import remove_if_ours, write_file

LOOP_IDLE_S = 0.2
DAEMON_JSON = "daemon.json"
STAGE_STATES = tuple(s for s in STATES if s not in ("IDLE", "ERROR"))


class Daemon:
    """One run, its loop thread and its HTTP server, in this process. serve() returns the exit code."""

    def __init__(self, config: Config, mode: str | None = None, pid_file: str | None = None,
                 log_file: str | None = None,
                 on_ready: Callable[[int, str], None] | None = None) -> None:
        self.config = config
        self.mode = mode
        self.pid_file = os.path.abspath(pid_file) if pid_file else None
        self.log_file = os.path.abspath(log_file) if log_file else None
        self.on_ready = on_ready
        self.url = ""
        self.loop_error: str | None = None
        self._wake = threading.Event()      # main thread: a signal came or the loop died
        self._stopping = threading.Event()  # loop thread: finish what is queued, then return
        self._signals = 0
        self._signal_name = ""
        self._action_lock = threading.Lock()
        self.auth = Auth(config)
        self.interrupt = Interrupt()  # set by a signal: the Machine ends its stage, keeps the run
        # The loop's writes wait out a full disk; its line ("disk full: <path>: ...") is kept
        # here, in memory, for the API: state.json may be the very file that cannot be written.
        self.disk_wait = DiskWait(self.interrupt, lambda line: self.log(f"heidi daemon: {line}"))

    # -- logging (stderr, the log file when detached); never the token, never headers ------------
    def log(self, message: str) -> None:
        if self.log_file:
            message = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def _reopen_log(self) -> None:
        """Point stdout/stderr at the log file again (after logrotate, or after starting a new
        run moved the old OUT_DIR/daemon.log into runs/<id>/)."""
        if not self.log_file:
            return
        try:
            fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self.log(f"heidi daemon: cannot reopen {self.log_file}: {exc.strerror}")
            return
        sys.stderr.flush()
        sys.stdout.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    # -- HTTP side: reads the disk, queues requests; never touches the Machine ------------------
    def status(self) -> dict[str, Any]:
        view = core_status(self.config)
        view["waiting"] = self.disk_wait.waiting  # None, or what the loop waits for
        return view

    def queue_action(self, action: str) -> tuple[int, dict[str, Any]]:
        """The checks `heidi <action>` makes against a held run, then a queued request."""
        cfg = self.config
        with self._action_lock:
            try:
                state = held_run_state(cfg)
            except StateError as exc:  # no state.json, and a journal changed outside heidi
                return 409, {"error": one_line(exc), "action": action}
            if state is None:
                return 409, {"error": f"no run in {cfg.out_dir}"}
            view = status_view(state, cfg)
            try:
                judge_action(action, view, queued=view["pending_requests"])
            except RefusedError as exc:
                return 409, {"error": one_line(exc), "action": action}
            pending = view["pending_requests"]
            if not (pending and pending[-1] == action):  # the same request twice is one request
                try:
                    control.request(cfg.control_dir, action)
                except OSError as exc:  # the request file cannot be written (a full disk)
                    return 507 if is_disk_full(exc) else 500, {"error": one_line(exc),
                                                               "action": action}
        return 202, {"action": action, "result": "queued"}

    # -- the loop thread: the only one that touches the Machine --------------------------------
    def _loop(self, machine: Machine) -> None:
        try:
            while True:
                stopping = self._stopping.is_set()
                machine.apply_requests()
                if stopping:
                    return
                state = machine.state
                if (state is not None and state["status"] == "running" and not state["paused"]
                        and state["state"] in STAGE_STATES):
                    machine.tick()
                else:
                    self._stopping.wait(LOOP_IDLE_S)
        except Interrupted:
            return  # the signal ended the stage; the run stays interrupted for the next daemon
        except BaseException as exc:
            self.loop_error = one_line(exc)
            self.log(f"heidi daemon: the loop failed: {self.loop_error}")
            if not isinstance(exc, (HeidiError, OSError)):  # an I/O error is its one line
                self.log("".join(traceback.format_exception(exc)).rstrip())
            self._wake.set()

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name
        self.interrupt.set(signum)  # the loop thread's stage runner sees it within 0.25 s
        self._wake.set()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reopen_log()

    # -- the whole life ------------------------------------------------------------------------
    def serve(self) -> int:
        """Take the run, serve until SIGTERM/SIGINT (or the loop fails); the exit code."""
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        # Detached, SIGHUP is logrotate's "reopen your log"; in the foreground, the terminal went away.
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup if self.log_file
                                                else self._on_signal)
        try:
            return self._serve()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _serve(self) -> int:
        cfg = self.config
        check_bind(cfg)
        apply_limits(cfg)
        # RunLocked: another process holds the run. Taken for a long stay: the whole chain is
        # checked, and each append checks the journal is still the size this process left it.
        machine = Machine(cfg, interrupt=self.interrupt).open(verify_chain=True)
        if not cfg.mock_subprocesses:
            # Fork the stage watchdog now, while this process is still single-threaded.
            from .._fast.supervise import ensure_watchdog
            ensure_watchdog()
        forced = False
        try:
            server = make_server(cfg.host, cfg.port, self)
            try:
                state = machine.state
                if state is None or state["status"] in ("completed", "stopped"):
                    done = completed_run(cfg)
                    if done is not None:
                        # as `heidi run` does: a RUN_ID whose run completed (here or archived)
                        # starts nothing; the daemon serves the status (a unit restarted after
                        # the run ended must not fail, nor start the run again)
                        where = done.get("archived") or cfg.out_dir
                        self.log(f"heidi daemon: run {cfg.run_id} already completed ({where}); "
                                 "starting no run (choose another RUN_ID for a new one)")
                    else:
                        machine.start(self.mode)
                        if self.log_file and not os.path.exists(self.log_file):
                            self._reopen_log()  # the old run's daemon.log went with it to runs/
                host, port = server.server_address[:2]
                self.url = url(str(host), int(port))
                pid = os.getpid()
                info = {"pid": pid, "host": str(host), "port": int(port), "url": self.url,
                        "run_id": (machine.state or {}).get("run_id"), "version": __version__}
                daemon_json = os.path.join(cfg.out_dir, DAEMON_JSON)
                try:
                    if self.pid_file:
                        write_file(self.pid_file, f"{pid}\n".encode())
                    write_file(daemon_json, orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
                    # From here on the loop waits out a full disk (the API says so); before,
                    # one would keep the daemon from ever listening: it exits with the path.
                    self.disk_wait.clock = machine.clock
                    machine.disk_wait = self.disk_wait
                    code, forced = self._run(machine, server)
                    return code
                finally:
                    remove_if_ours(daemon_json, pid)
                    remove_if_ours(self.pid_file, pid)
            finally:
                server.server_close()
        finally:
            if not forced:  # forced: the loop thread may still be inside; the kernel drops the lock
                machine.close()

    def _run(self, machine: Machine, server: Server) -> tuple[int, bool]:
        loop = threading.Thread(target=self._loop, args=(machine,), name="heidi-loop", daemon=True)
        http = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                                name="heidi-http", daemon=True)
        loop.start()
        http.start()
        self.log(f"heidi daemon listening on {self.url}")
        if self.on_ready is not None:
            self.on_ready(os.getpid(), self.url)
        while not self._wake.wait(1.0):
            pass
        if self.loop_error is None:
            # The process stops, the run does not: a running stage ends (the Machine saw the
            # interrupt) and the next daemon, tick or `heidi run` continues the same run.
            self.log(f"heidi daemon: {self._signal_name or 'signal'} received, exiting; the run "
                     "stays as it is (a running stage is ended and runs again next time)")
        self._stopping.set()
        forced = False
        seen = self._signals
        while loop.is_alive():
            loop.join(0.5)
            if self._signals > max(seen, 1) and loop.is_alive():
                self.log("heidi daemon: second signal, exiting without waiting for the loop")
                forced = True
                break
        server.shutdown()
        http.join(5.0)
        if self.loop_error is None and not forced:
            self.log("heidi daemon: stopped")
        return (1 if self.loop_error is not None or forced else 0), forced
