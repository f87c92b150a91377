"""The daemon's HTTP side: a threaded stdlib server and one router for every endpoint. It reads the
run from disk and queues control requests through its Daemon; it never touches the Machine."""
from __future__ import annotations

import socket
import socketserver
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from .. import control
from .._version import __version__
from ..errors import HeidiError, one_line
from ..journal import read_events_page
from .metrics import render_metrics

if TYPE_CHECKING:
    from .service import Daemon

API = "/api/v1"
MAX_BODY_BYTES = 64 * 1024
EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000
REQUEST_TIMEOUT_S = 30.0
# The status page, package data (bundled by heidi.spec). Read on import, before --detach forks: a
# one-file frozen heidi deletes its unpacked files once the parent it detached from exits.
PAGE = files("heidi").joinpath("page.html").read_bytes()


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(ThreadingHTTPServer):
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
            self.app.log(f"heidi daemon: HTTP connection failed: {one_line(exc)}")


def make_server(host: str, port: int, app: "Daemon") -> Server:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("_Server6" if family == socket.AF_INET6 else "_Server4", (Server,),
               {"address_family": family})
    try:
        server = cls((host, port), _Handler)
    except OSError as exc:
        raise HeidiError(f"cannot listen on {url(host, port)}: {exc.strerror or exc}") from None
    server.app = app
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S
    server: Server

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
            if not app.auth.authorized(self.headers.get("Authorization"), path, query):
                self._error(401, "missing or wrong API token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": 'Bearer realm="heidi"'})
                return
            if not app.auth.host_allowed(self.headers.get("Host")):
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
                if not app.auth.origin_allowed(self.headers.get("Origin"), self.headers.get("Host")):
                    self._error(403, "cross-origin request refused")
                    return
                code, obj = app.queue_action(action)
                self._json(code, obj)
                return
            self._error(404, f"no such endpoint {path[:100]}")
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception as exc:  # one line in the log, one line to the client
            line = one_line(exc)
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
