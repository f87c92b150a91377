"""`heidi daemon`: the loop on one thread, a small local HTTP API on others (design.md §8).

One thread owns the Machine and drives the run (apply control requests, tick while a stage state
waits, idle otherwise). The HTTP threads never touch the Machine: they read state.json and the
journal from disk, and queue control requests in OUT_DIR/control/ exactly as `heidi stop` from
another process would; the loop thread applies them at its next boundary, and a stop also ends a
running stage (the stage runner polls for it). Standard library only.

Endpoints (JSON unless noted; with HEIDI_API_TOKEN set, all but /healthz need
`Authorization: Bearer <token>`):
  GET  /healthz                      200 {"ok": true}
  GET  /api/v1/status                200 the status view
  POST /api/v1/action/<action>       202 {"action", "result": "queued"} | 409 {"error"}
                                     (action: train_now, pause, resume, stop)
  GET  /api/v1/events?since=N&limit=M  200 {"events": [...], "next": K}
  GET  /metrics                      200 Prometheus text exposition 0.0.4
  GET  /                             200 HTML status page (?token=... accepted here only)
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import orjson

from . import control
from ._fast import atomic as _atomic
from ._version import __version__
from .config import Config
from .core import _precheck_queued, status as core_status
from .errors import ConfigError, HeidiError, RefusedError, RunLocked
from .limits import apply_limits
from .machine import ACTIVE_STATUSES, STATES, Machine, status_view
from .status import read_state

API = "/api/v1"
MAX_BODY_BYTES = 64 * 1024
EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000
MAX_EVENT_LINE_BYTES = 1 << 20
LOOP_IDLE_S = 0.2
REQUEST_TIMEOUT_S = 30.0
DETACH_READY_TIMEOUT_S = 120.0
DAEMON_JSON = "daemon.json"
STAGE_STATES = tuple(s for s in STATES if s not in ("IDLE", "ERROR"))


# -- small helpers -------------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, HeidiError) and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals; any other name or address is not."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(cfg: Config) -> None:
    """Refuse (ConfigError, exit 2) to serve a non-loopback address without a token."""
    if not is_loopback(cfg.host) and not cfg.api_token:
        raise ConfigError(f"HEIDI_HOST={cfg.host!r}: binding a non-loopback address requires "
                          "HEIDI_API_TOKEN; set a token or bind 127.0.0.1")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_file(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    _atomic.atomic_write(path, data, 0o600, True)


def _remove_if_ours(path: str | None, pid: int) -> None:
    """Remove a pid file / daemon.json only while it still names this process."""
    if not path:
        return
    try:
        with open(path, "rb") as fh:
            data = fh.read(4096)
    except OSError:
        return
    first = data.split(b"\n", 1)[0].strip()
    if first == str(pid).encode() or (path.endswith(".json") and _json_pid(data) == pid):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _json_pid(data: bytes) -> int | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj.get("pid") if isinstance(obj, dict) else None


# -- reading the run for the API ----------------------------------------------------------------

def _skip_lines(fh: Any, n: int) -> int:
    """Position fh just after its n-th newline, reading in chunks; returns the lines skipped."""
    if n <= 0:
        return 0
    done = 0
    pos = 0
    while True:
        chunk = fh.read(1 << 16)
        if not chunk:
            return done
        count = chunk.count(b"\n")
        if done + count < n:
            done += count
            pos += len(chunk)
            continue
        idx = -1
        for _ in range(n - done):
            idx = chunk.index(b"\n", idx + 1)
        fh.seek(pos + idx + 1)
        return n


def read_events_page(path: str, since: int, limit: int) -> tuple[list[Any], int]:
    """Events from line since+1 on, at most limit of them, and the `since` of the next page.

    Streams the file (never loads it whole); a last line still being written is left for later.
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return [], since
    events: list[Any] = []
    with fh:
        line_no = _skip_lines(fh, since)
        if line_no < since:
            return [], line_no
        while len(events) < limit:
            line = fh.readline(MAX_EVENT_LINE_BYTES + 1)
            if not line:
                break
            if not line.endswith(b"\n"):
                if len(line) <= MAX_EVENT_LINE_BYTES:
                    break  # a line being appended right now: the next page has it
                while line and not line.endswith(b"\n"):  # over-long: skip it, say so
                    line = fh.readline(1 << 16)
                if not line:
                    break
                line_no += 1
                events.append({"line": line_no, "error": "line over 1 MiB"})
                continue
            line_no += 1
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                events.append({"line": line_no, "error": f"invalid JSON ({exc})"[:200]})
    return events, line_no


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


def render_metrics(view: dict[str, Any]) -> str:
    """The status view in Prometheus text exposition format 0.0.4."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, Any]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = _number(value)
            if text is not None:
                out.append(f"{name}{labels} {text}")

    has_run = view.get("run_id") is not None
    metric("heidi_info", "gauge", "The run this daemon drives (labels), always 1.",
           [(f'{{run_id="{_label(view.get("run_id") or "")}",mode="{_label(view.get("mode") or "")}",'
             f'status="{_label(view.get("status") or "none")}",version="{_label(__version__)}"}}', 1)])
    metric("heidi_round", "gauge", "Current round (0 before the first).",
           [("", int(view.get("round") or 0))])
    metric("heidi_rounds", "gauge", "Rounds the run is configured for.",
           [("", int(view.get("rounds") or 0))])
    metric("heidi_state", "gauge", "1 for the machine state the run is in, 0 for the others.",
           [(f'{{state="{s}"}}', 1 if has_run and view.get("state") == s else 0) for s in STATES])
    metric("heidi_paused", "gauge", "1 while the run is paused.", [("", bool(view.get("paused")))])
    metric("heidi_events_total", "counter", "Events in the run's journal.",
           [("", int((view.get("journal") or {}).get("events", 0) or 0))])
    metric("heidi_pending_requests", "gauge", "Control requests waiting to be applied.",
           [("", len(view.get("pending_requests") or ()))])
    metric("heidi_counter", "gauge", "The run's counters (sum of counters_delta).",
           [(f'{{name="{_label(k)}"}}', v) for k, v in sorted((view.get("counters") or {}).items())])
    metric("heidi_usage", "gauge", "The run's usage (sum of usage_delta).",
           [(f'{{name="{_label(k)}"}}', v) for k, v in sorted((view.get("usage") or {}).items())])
    return "\n".join(out) + "\n"


# -- HTTP ------------------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    app: "Daemon"

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) that can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
            return
        if exc is not None:
            self.app.log(f"heidi daemon: HTTP connection failed: {_one_line(exc)}")


def _make_server(host: str, port: int, app: "Daemon") -> _Server:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("_Server6" if family == socket.AF_INET6 else "_Server4", (_Server,),
               {"address_family": family})
    try:
        server = cls((host, port), _Handler)
    except OSError as exc:
        raise HeidiError(f"cannot listen on {_url(host, port)}: {exc.strerror or exc}") from None
    server.app = app
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server: _Server

    def version_string(self) -> str:
        return f"heidi/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log: request lines may carry ?token=, headers carry the token

    # every method goes through one router, so an unknown method on a known path is a 405
    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    # -- responses -------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, orjson.dumps(obj) + b"\n", "application/json", headers)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(code, {"error": message}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the base class's own errors (bad request line, headers too long, ...) as JSON too
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        if getattr(self, "command", None) is None:
            self.command = "GET"
        self._error(code, (message or phrase).splitlines()[0][:200] if (message or phrase) else phrase)

    # -- request checks --------------------------------------------------------------------
    def _body_ok(self) -> bool:
        """Read (and drop) a bounded body; False when a response was already sent."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "a body needs Content-Length (no chunked bodies)")
            return False
        raw = self.headers.get("Content-Length")
        if raw is None:
            return True
        try:
            length = int(raw.strip())
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(400, "invalid Content-Length")
            return False
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"body over {MAX_BODY_BYTES} bytes")
            return False
        remaining = length
        while remaining:
            chunk = self.rfile.read(remaining)
            if not chunk:
                self.close_connection = True
                return True
            remaining -= len(chunk)
        return True

    def _allow(self, methods: tuple[str, ...]) -> bool:
        if self.command in methods:
            return True
        self._error(405, f"{self.command} not allowed here; use {' or '.join(methods)}",
                    {"Allow": ", ".join(methods)})
        return False

    # -- routing ---------------------------------------------------------------------------
    def _handle(self) -> None:
        app = self.server.app
        path = "?"
        try:
            split = urlsplit(self.path)
            path, query = split.path or "/", split.query
            if not self._body_ok():
                return
            if path == "/healthz":
                if self._allow(("GET", "HEAD")):
                    self._json(200, {"ok": True})
                return
            if not app.authorized(self.headers.get("Authorization"), path, query):
                self._error(401, "missing or wrong API token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": 'Bearer realm="heidi"'})
                return
            if not app.host_allowed(self.headers.get("Host")):
                self._error(403, "Host header is not a loopback name (DNS rebinding?)")
                return
            if path == "/":
                if self._allow(("GET", "HEAD")):
                    self._send(200, PAGE, "text/html; charset=utf-8", {
                        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                        "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
                        "form-action 'none'; frame-ancestors 'none'",
                        "Referrer-Policy": "no-referrer"})
                return
            if path == f"{API}/status":
                if self._allow(("GET", "HEAD")):
                    self._json(200, app.status())
                return
            if path == f"{API}/events":
                if self._allow(("GET", "HEAD")):
                    self._events(query)
                return
            if path == "/metrics":
                if self._allow(("GET", "HEAD")):
                    self._send(200, render_metrics(app.status()).encode(),
                               "text/plain; version=0.0.4; charset=utf-8")
                return
            if path.startswith(f"{API}/action/"):
                action = path[len(f"{API}/action/"):].replace("-", "_")
                if action not in control.ACTIONS:
                    self._error(404, f"no such action {action!r}; use one of {', '.join(control.ACTIONS)}")
                    return
                if not self._allow(("POST",)):
                    return
                if not app.origin_allowed(self.headers.get("Origin"), self.headers.get("Host")):
                    self._error(403, "cross-origin request refused")
                    return
                code, obj = app.queue_action(action)
                self._json(code, obj)
                return
            self._error(404, f"no such endpoint {path[:100]}")
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # one line in the log, one line to the client
            line = _one_line(exc)
            app.log(f"heidi daemon: {self.command} {path[:100]} failed: {line}")
            self.close_connection = True
            try:
                self._error(500, line[:300])
            except OSError:
                pass

    def _events(self, query: str) -> None:
        try:
            params = parse_qs(query, keep_blank_values=True, max_num_fields=16)
            since = int(params.get("since", ["0"])[-1] or 0)
            limit = int(params.get("limit", [str(EVENTS_DEFAULT_LIMIT)])[-1] or EVENTS_DEFAULT_LIMIT)
        except ValueError:
            self._error(400, "since and limit must be integers")
            return
        if since < 0 or limit < 1:
            self._error(400, "since must be 0 or more and limit 1 or more")
            return
        limit = min(limit, EVENTS_MAX_LIMIT)
        events, nxt = read_events_page(self.server.app.config.journal_path, since, limit)
        self._json(200, {"events": events, "next": nxt})


# -- the daemon ------------------------------------------------------------------------------------

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
        self._token = config.api_token.encode() if config.api_token else None
        self._host_names = {config.host.strip("[]").lower()}

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
        return core_status(self.config)

    def authorized(self, header: str | None, path: str, query: str) -> bool:
        if self._token is None:
            return True
        given = b""
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip().encode("utf-8", "replace")
        elif path == "/" and query:
            # the status page may be opened as /?token=...; its own requests use the header
            try:
                given = parse_qs(query, max_num_fields=16).get("token", [""])[-1].encode("utf-8", "replace")
            except ValueError:
                given = b""
        return hmac.compare_digest(given, self._token)

    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token, only loopback Host names: a web page cannot DNS-rebind onto the API."""
        if self._token is not None or not host_header:
            return True
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host[1:]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return is_loopback(host) or host in self._host_names

    @staticmethod
    def origin_allowed(origin: str | None, host_header: str | None) -> bool:
        """A browser POSTing from another site carries its Origin: refuse it (CSRF)."""
        if origin is None:
            return True
        try:
            netloc = urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            return False
        return bool(netloc) and netloc == (host_header or "").strip().lower()

    def queue_action(self, action: str) -> tuple[int, dict[str, Any]]:
        """The checks `heidi <action>` makes against a held run, then a queued request."""
        cfg = self.config
        with self._action_lock:
            state = read_state(cfg.state_path)
            if state is None:
                return 409, {"error": f"no run in {cfg.out_dir}"}
            view = status_view(state, cfg)
            try:
                _precheck_queued(action, view)
            except RefusedError as exc:
                return 409, {"error": _one_line(exc), "action": action}
            pending = view["pending_requests"]
            if not (pending and pending[-1] == action):  # the same request twice is one request
                control.request(cfg.control_dir, action)
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
        except BaseException as exc:
            self.loop_error = _one_line(exc)
            self.log(f"heidi daemon: the loop failed: {self.loop_error}")
            if not isinstance(exc, HeidiError):
                self.log("".join(traceback.format_exception(exc)).rstrip())
            self._wake.set()

    # -- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        self._signal_name = signal.Signals(signum).name
        self._wake.set()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reopen_log()

    # -- the whole life ------------------------------------------------------------------------
    def serve(self) -> int:
        """Take the run, serve until SIGTERM/SIGINT (or the loop fails); the exit code."""
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if self.log_file:
            handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
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
        machine = Machine(cfg).open(verify_chain=True)
        if not cfg.mock_subprocesses:
            # Fork the stage watchdog now, while this process is still single-threaded.
            from ._fast.supervise import ensure_watchdog
            ensure_watchdog()
        forced = False
        try:
            server = _make_server(cfg.host, cfg.port, self)
            try:
                state = machine.state
                if state is None or state["status"] in ("completed", "stopped"):
                    machine.start(self.mode)
                    if self.log_file and not os.path.exists(self.log_file):
                        self._reopen_log()  # the old run's daemon.log went with it to runs/
                host, port = server.server_address[:2]
                self.url = _url(str(host), int(port))
                pid = os.getpid()
                info = {"pid": pid, "host": str(host), "port": int(port), "url": self.url,
                        "run_id": (machine.state or {}).get("run_id"), "version": __version__}
                daemon_json = os.path.join(cfg.out_dir, DAEMON_JSON)
                try:
                    if self.pid_file:
                        _write_file(self.pid_file, f"{pid}\n".encode())
                    _write_file(daemon_json, orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
                    code, forced = self._run(machine, server)
                    return code
                finally:
                    _remove_if_ours(daemon_json, pid)
                    _remove_if_ours(self.pid_file, pid)
            finally:
                server.server_close()
        finally:
            if not forced:  # forced: the loop thread may still be inside; the kernel drops the lock
                machine.close()

    def _run(self, machine: Machine, server: _Server) -> tuple[int, bool]:
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
            self.log(f"heidi daemon: {self._signal_name or 'signal'} received, stopping")
            try:
                state = read_state(self.config.state_path)
                if state is not None and state.get("status") in ACTIVE_STATUSES:
                    # a SIGTERM'd daemon leaves its run stopped: the stage ends, pipeline_stop
                    control.request(self.config.control_dir, "stop")
            except (HeidiError, OSError) as exc:
                self.log(f"heidi daemon: cannot queue the stop: {_one_line(exc)}")
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


# -- entry point for the CLI -----------------------------------------------------------------------

def run_daemon(config: Config, mode: str | None = None, detach: bool = False,
               pid_file: str | None = None, log_file: str | None = None) -> int:
    """`heidi daemon`: foreground (returns the exit code) or --detach (the parent returns once the
    daemon listens; HeidiError with the daemon's exit code and one line when it could not start)."""
    check_bind(config)
    if not detach:
        return Daemon(config, mode, pid_file=pid_file).serve()
    pid_file = os.path.abspath(pid_file or os.path.join(config.out_dir, "heidi.pid"))
    log_file = os.path.abspath(log_file or os.path.join(config.out_dir, "daemon.log"))
    return _detach(config, mode, pid_file, log_file)


def _detach(config: Config, mode: str | None, pid_file: str, log_file: str) -> int:
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
        daemon.log(f"heidi: {_one_line(exc)}")
        tell(f"err {code} {_one_line(exc)}")
        return code
    except BaseException as exc:
        daemon.log(f"heidi: {_one_line(exc)}")
        daemon.log("".join(traceback.format_exception(exc)).rstrip())
        tell(f"err 1 {_one_line(exc)}")
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


# -- the status page ---------------------------------------------------------------------------------

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>heidi</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .6em}
table{border-collapse:collapse}td,th{padding:.2em .7em;text-align:left;vertical-align:top}
#st th{color:#666;font-weight:normal}
#ev{margin-top:1em;font:12px/1.3 ui-monospace,monospace}#ev td{border-top:1px solid #ddd}
.warn{color:#a60}.error,.critical{color:#b00}.success{color:#070}
button{margin:.8em .4em 0 0;padding:.3em .9em}#msg{margin-left:.6em;color:#555}
</style></head><body>
<h1>heidi daemon</h1>
<table id="st"><tbody>
<tr><th>run</th><td id="run_id">-</td></tr><tr><th>status</th><td id="status">-</td></tr>
<tr><th>state</th><td id="state">-</td></tr><tr><th>round</th><td id="round">-</td></tr>
<tr><th>mode</th><td id="mode">-</td></tr><tr><th>stage</th><td id="stage">-</td></tr>
<tr><th>paused</th><td id="paused">-</td></tr><tr><th>pending</th><td id="pending">-</td></tr>
<tr><th>last error</th><td id="last_error">-</td></tr>
</tbody></table>
<div><button data-a="train_now">Train now</button><button data-a="pause">Pause</button><button
data-a="resume">Resume</button><button data-a="stop">Stop</button><span id="msg"></span></div>
<table id="ev"><thead><tr><th>#</th><th>time</th><th>level</th><th>event</th><th>stage</th>
<th>message</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const q = new URLSearchParams(location.search), token = q.get("token");
if (token) history.replaceState(null, "", location.pathname);
const hdrs = token ? {"Authorization": "Bearer " + token} : {};
const $ = id => document.getElementById(id);
function set(id, v) { $(id).textContent = (v === null || v === undefined || v === "") ? "-" : String(v); }
async function getJSON(path) {
  const r = await fetch(path, {headers: hdrs, cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function refresh() {
  try {
    const s = await getJSON("/api/v1/status");
    set("run_id", s.run_id); set("status", s.status); set("state", s.state);
    set("round", s.round + " / " + (s.rounds || 0)); set("mode", s.mode); set("stage", s.stage);
    set("paused", s.paused ? "yes" : "no"); set("pending", (s.pending_requests || []).join(" "));
    set("last_error", s.last_error);
    const total = (s.journal && s.journal.events) || 0, since = Math.max(0, total - 20);
    const e = await getJSON("/api/v1/events?since=" + since + "&limit=20");
    const body = $("ev").tBodies[0];
    body.textContent = "";
    e.events.slice().reverse().forEach((ev, i) => {
      const tr = body.insertRow();
      [e.next - i, ev.ts, ev.level, ev.event_type, ev.stage, ev.message || ev.error].forEach(v => {
        tr.insertCell().textContent = (v === undefined || v === null) ? "" : String(v);
      });
      tr.className = ev.level || "";
    });
  } catch (err) { set("msg", err.message); }
}
document.querySelectorAll("button[data-a]").forEach(b => b.addEventListener("click", async () => {
  try {
    const r = await fetch("/api/v1/action/" + b.dataset.a, {method: "POST", headers: hdrs});
    const j = await r.json();
    set("msg", r.ok ? b.dataset.a + ": " + j.result : j.error);
  } catch (err) { set("msg", err.message); }
  refresh();
}));
refresh();
setInterval(refresh, 2000);
</script></body></html>
"""
