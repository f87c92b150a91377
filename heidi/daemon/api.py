"""The daemon's HTTP side: one router for every endpoint, served by the bounded asyncio transport
in server.py. It reads the run from disk and queues control requests through its Daemon; it never
touches the Machine. Handlers run on the transport's worker threads, one request each."""
from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from .. import control
from .._fast.redact import redact
from .._version import __version__
from ..errors import HeidiError, one_line
from ..journal import read_events_page
from .metrics import render_metrics
from .http1 import MAX_BODY_BYTES, Request, Response
from .server import HttpServer

if TYPE_CHECKING:
    from .service import Daemon

API = "/api/v1"
EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000
__all__ = ["API", "MAX_BODY_BYTES", "PAGE", "Server", "make_server", "url"]
# The status page, package data (bundled by heidi.spec). Read on import, before --detach forks: a
# one-file frozen heidi deletes its unpacked files once the parent it detached from exits.
PAGE = files("heidi").joinpath("page.html").read_bytes()
Server = HttpServer  # what service.py serves with: serve_forever, shutdown, server_close
UNAUTHORIZED_PAGE = (b'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>heidi</title>'
                     b'</head><body style="font:14px system-ui,sans-serif;margin:1.5em"><h1>heidi '
                     b'daemon</h1><p>This daemon needs its API token. Open the page once as '
                     b'<code>/?token=&lt;HEIDI_API_TOKEN&gt;</code>: the browser then keeps it (an '
                     b'HttpOnly cookie for this site) and reloads work.</p></body></html>\n')


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def log_line(app: "Daemon", line: str) -> None:
    """One line to the daemon log: never the API token, nor anything that looks like a secret."""
    token = app.config.api_token
    if token:
        line = line.replace(token, "[REDACTED]")
    app.log(redact(" ".join(line.split())))


def make_server(host: str, port: int, app: "Daemon") -> Server:
    """Bind host:port (HeidiError when it cannot); the server answers through _Handler."""
    try:
        return HttpServer(host, port, lambda request: _Handler(request, app).handle(),
                          lambda line: log_line(app, line),
                          f"heidi/{__version__}", app.config.api_request_timeout_s)
    except OSError as exc:
        raise HeidiError(f"cannot listen on {url(host, port)}: {exc.strerror or exc}") from None


class _Handler:
    """One request through the router; handle() returns its Response."""

    def __init__(self, request: Request, app: "Daemon") -> None:
        self.app = app
        self.command = request.method
        self.path = request.target
        self.headers = request.headers
        self.close_connection = False
        self.response: Response | None = None

    def handle(self) -> Response:
        self._handle()
        if self.response is None:  # every branch answers; a missing answer is a bug
            raise RuntimeError(f"no response to {self.command} {self.path[:100]}")
        return self.response

    # -- responses -------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        # the transport adds Server, Date, Content-Length, Cache-Control, X-Content-Type-Options,
        # Connection: close, and drops the body of a HEAD
        self.response = Response(code, body, ctype, dict(headers or {}), self.close_connection)

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, orjson.dumps(obj) + b"\n", "application/json", headers)

    def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(code, {"error": message}, headers)

    # -- request checks (framing, body limits: server.py) -------------------------------------
    def _allow(self, methods: tuple[str, ...]) -> bool:
        if self.command in methods:
            return True
        self._error(405, f"{self.command} not allowed here; use {' or '.join(methods)}",
                    {"Allow": ", ".join(methods)})
        return False

    # -- routing ---------------------------------------------------------------------------
    def _handle(self) -> None:
        app = self.app
        path = "?"
        try:
            split = urlsplit(self.path)
            path, query = split.path or "/", split.query
            if path == "/healthz":
                if self._allow(("GET", "HEAD")):
                    self._json(200, {"ok": True})
                return
            how = app.auth.authorized_by(self.headers.get("Authorization"), path, query,
                                         self.headers.get("Cookie"))
            if how is None:
                challenge = {"WWW-Authenticate": 'Bearer realm="heidi"'}
                if path == "/" and self.command in ("GET", "HEAD"):
                    self._send(401, UNAUTHORIZED_PAGE, "text/html; charset=utf-8", challenge)
                else:
                    self._error(401, "missing or wrong API token (Authorization: Bearer <token>)",
                                challenge)
                return
            if not app.auth.host_allowed(self.headers.get("Host")):
                self._error(403, "Host header is not a loopback name (DNS rebinding?)")
                return
            if path == "/" and how == "query":
                # The token goes into an HttpOnly cookie and out of the address bar (history,
                # screenshots, a reload): the page's requests and a reload carry the cookie.
                if self._allow(("GET", "HEAD")):
                    self._send(303, b"", "text/plain; charset=utf-8",
                               {"Location": "/", "Set-Cookie": app.auth.set_cookie(),
                                "Referrer-Policy": "no-referrer"})
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
                if not app.auth.origin_allowed(self.headers.get("Origin"), self.headers.get("Host"),
                                               by_cookie=how == "cookie"):
                    self._error(403, "cross-origin request refused")
                    return
                code, obj = app.queue_action(action)
                self._json(code, obj)
                return
            self._error(404, f"no such endpoint {path[:100]}")
        except Exception as exc:  # one line in the log, one line to the client
            line = one_line(exc)
            log_line(app, f"heidi daemon: {self.command} {path[:100]} failed: {line}")
            self.close_connection = True
            self._error(500, redact(line)[:300])

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
        events, nxt = read_events_page(self.app.config.journal_path, since, limit)
        self._json(200, {"events": events, "next": nxt})
