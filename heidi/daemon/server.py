"""The daemon's HTTP/1.1 transport: one asyncio loop on a thread of its own, a connection cap taken
from RLIMIT_NOFILE (the oldest idle connection is evicted to admit a new one), a whole-request
deadline, an idle keep-alive limit, and a few daemon worker threads for the handlers' disk work."""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import queue
import resource
import socket
import threading
import time
from typing import Callable

from ..errors import one_line
from .http1 import (MAX_HEAD_BYTES, BadRequest, Request, Response, body_length, error_response,
                    head_end, parse_head, render)

KEEPALIVE_IDLE_S = 5.0       # an idle keep-alive connection is closed after this (or the deadline)
MAX_CONNECTIONS = 1024
MIN_CONNECTIONS = 8
FD_RESERVE = 128             # left to the loop: journal, /proc, stage pipes, pidfds, cgroup files
WORKERS = 4
SWEEP_S = 0.25
ACCEPT_BATCH = 16
ACCEPT_BACKOFF_S = 0.05
ACCEPT_SETTLE_S = 0.01       # evicted sockets close within a pass or two of the loop
CLOSE_LINGER_S = 2.0         # a closing connection whose peer does not read is aborted after this
LOG_EVERY_S = 10.0
PRESSURE_HOLD_S = 10.0       # after EMFILE at accept, the lowered cap holds this long, then grows


def connection_cap(soft: int | None = None) -> int:
    """How many connections the API holds at once: 1024, less whatever the fd reserve needs."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - min(FD_RESERVE, soft // 2)))


class _Conn(asyncio.Protocol):
    """One client connection: reading (evictable), busy (a worker runs its request) or closing."""

    def __init__(self, server: "HttpServer") -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "reading"
        self.deadline = time.monotonic() + server.request_timeout_s
        self.idle = False         # waiting for the next request on a kept-alive connection
        self.head: tuple | None = None
        self.body_len = 0
        self.close_after = False  # bytes or EOF arrived while busy: answer, then close
        self.task: asyncio.Task | None = None  # making the transport

    def itself(self) -> "_Conn":
        return self  # the protocol factory of this one connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.state == "closed":  # evicted while its transport was being made
            transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.server.forget(self)

    def eof_received(self) -> bool:
        if self.state == "busy":
            self.close_after = True
            return True  # half-closed: still answer
        return False

    def data_received(self, data: bytes) -> None:
        if self.state == "busy":
            self.close_after = True  # pipelined while a request runs: never run, and close
        if self.state != "reading":
            return
        if self.idle:
            self.idle = False
            self.deadline = time.monotonic() + self.server.request_timeout_s
        self.buf += data
        try:
            self._parse()
        except BadRequest as bad:
            self.fail(bad.code, bad.message)

    def _parse(self) -> None:
        if self.head is None:
            while self.buf[:2] == b"\r\n" or self.buf[:1] == b"\n":  # blank lines before a request
                del self.buf[:2 if self.buf[:1] == b"\r" else 1]
            end, start = head_end(self.buf)
            if end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    if b"\n" not in self.buf:
                        raise BadRequest(414, "Request-URI Too Long")
                    raise BadRequest(431, "Request header fields too long")
                return
            if end > MAX_HEAD_BYTES:
                raise BadRequest(431, "Request header fields too long")
            self.head = parse_head(bytes(self.buf[:end]))
            self.body_len = body_length(self.head[3])
            del self.buf[:start]
            expect = (self.head[3].get("Expect") or "").lower()
            if (expect == "100-continue" and self.head[2] >= (1, 1) and self.body_len > len(self.buf)
                    and self.transport is not None):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(self.buf) < self.body_len:
            return
        if len(self.buf) > self.body_len:
            raise BadRequest(400, "pipelined requests are not accepted; send the next one after the response")
        method, target, version, headers, close = self.head
        request = Request(method, target, version, headers, bytes(self.buf), close)
        self.buf.clear()
        self.head = None
        self.state = "busy"
        self.server.idle_conns.pop(self, None)
        self.server.submit(self, request)

    def respond(self, request: Request, resp: Response) -> None:
        if self.state != "busy" or self.transport is None:
            return
        close = request.close or resp.close or self.close_after
        self.transport.write(render(resp, self.server.server_name, close, request.method == "HEAD"))
        if close:
            self.shut()
            return
        self.state = "reading"
        self.idle = True
        self.deadline = time.monotonic() + min(KEEPALIVE_IDLE_S, self.server.request_timeout_s)
        self.server.idle_conns[self] = None

    def fail(self, code: int, message: str) -> None:
        if self.transport is not None and self.state == "reading":
            self.transport.write(render(error_response(code, message), self.server.server_name,
                                        True, False))
        self.shut()

    def shut(self) -> None:
        """Close after what is written has gone; the sweep aborts a peer that does not read."""
        self.state = "closing"
        self.server.idle_conns.pop(self, None)
        self.deadline = time.monotonic() + CLOSE_LINGER_S
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        if self.state == "reading":
            if self.buf or self.head is not None:
                self.fail(408, f"request not complete within {self.server.request_timeout_s:g} s")
            else:
                self.shut()  # idle: nothing to answer
        elif self.state == "closing" and self.transport is not None:
            self.transport.abort()


class HttpServer:
    """serve_forever() runs the API on the calling thread until shutdown() from another one.

    handler(request) runs on a worker thread and returns the Response; anything it raises is a
    500 and one line in the log. Nothing here raises out of serve_forever."""

    def __init__(self, host: str, port: int, handler: Callable[[Request], Response],
                 log: Callable[[str], None], server_name: str, request_timeout_s: float = 10.0,
                 max_connections: int | None = None, workers: int = WORKERS) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(min(socket.SOMAXCONN, 1024))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()
        self.handler, self.log, self.server_name = handler, log, server_name
        self.request_timeout_s = request_timeout_s
        self.cap = self.cap_max = max_connections or connection_cap()
        self._pressure_at = 0.0
        self.conns: set[_Conn] = set()
        self.idle_conns: dict[_Conn, None] = {}  # insertion order: the oldest waiting first
        self._workers = workers
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self._shutdown = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._logged: dict[str, float] = {}

    # -- life ----------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(); a failure of the server itself is logged and it starts again."""
        self._started = True
        # asyncio's own warnings (a peer gone mid-write...) are not the daemon log's business;
        # what matters reaches _on_loop_error
        logging.getLogger("asyncio").addHandler(logging.NullHandler())
        try:
            while not self._shutdown.is_set():
                loop = None
                try:
                    loop = asyncio.new_event_loop()
                    self._loop = loop
                    loop.set_exception_handler(self._on_loop_error)
                    self._accepting = False
                    self._start_accepting()
                    loop.call_later(SWEEP_S, self._sweep)
                    if self._shutdown.is_set():
                        break
                    loop.run_forever()
                except Exception as exc:  # EMFILE making the loop's own pipe, and the like
                    self.note("server", f"heidi daemon: the API failed, restarting it: {one_line(exc)}")
                    self._shutdown.wait(1.0)
                finally:
                    if loop is not None:
                        self._teardown(loop)
        finally:
            self._stopped.set()

    def _teardown(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = None  # connections lost from here on do not start accepting again
        self._resume = None
        try:
            if self._accepting:
                loop.remove_reader(self.socket.fileno())
            self._accepting = False
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.abort()
            self.conns.clear()
            self.idle_conns.clear()
            loop.call_soon(loop.stop)
            loop.run_forever()  # the aborts close their sockets on this last pass
        except Exception as exc:
            self.note("teardown", f"heidi daemon: API teardown: {one_line(exc)}")
        finally:
            loop.close()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait for it, a few seconds at most."""
        self._shutdown.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # already closed
        if self._started:
            self._stopped.wait(5.0)
        for _ in self._threads:
            self._jobs.put(None)

    def server_close(self) -> None:
        self.socket.close()

    # -- logging: one line, at most one per kind every LOG_EVERY_S ------------------------------
    def note(self, kind: str, line: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) < LOG_EVERY_S:
            return
        self._logged[kind] = now
        try:
            self.log(line)
        except Exception:
            pass

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        what = one_line(exc) if exc is not None else str(context.get("message", "error"))
        self.note("loop", f"heidi daemon: API error: {what}")

    # -- accepting -----------------------------------------------------------------------------
    def _start_accepting(self) -> None:
        if not self._accepting and self._loop is not None and not self._shutdown.is_set():
            self._loop.add_reader(self.socket.fileno(), self._on_accept)
            self._accepting = True

    def _pause_accepting(self, retry_s: float | None) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self.socket.fileno())
            self._accepting = False
        if retry_s is not None and self._resume is None and self._loop is not None:
            self._resume = self._loop.call_later(retry_s, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        self._start_accepting()

    def evict(self) -> bool:
        """Abort the connection that has waited longest for a request; False if none waits."""
        conn = next(iter(self.idle_conns), None)
        if conn is None:
            return False
        del self.idle_conns[conn]
        self.conns.discard(conn)
        conn.state = "closed"
        if conn.transport is not None:
            conn.transport.abort()
        elif conn.task is not None:
            conn.task.cancel()  # _made closes its socket
        return True

    def _on_accept(self) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(ACCEPT_BATCH):
            while len(self.conns) >= self.cap:
                if not self.evict():
                    self._pause_accepting(None)  # every connection is busy: forget() resumes
                    return
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                self._fd_pressure(exc)
                return
            conn = _Conn(self)
            self.conns.add(conn)
            self.idle_conns[conn] = None  # evictable from now on: the oldest accepted goes first
            try:
                sock.setblocking(False)
                conn.task = loop.create_task(loop.connect_accepted_socket(conn.itself, sock))
            except Exception:
                self.forget(conn)
                sock.close()
                raise
            conn.task.add_done_callback(functools.partial(self._made, conn, sock))

    def _fd_pressure(self, exc: OSError) -> None:
        """accept() failed (EMFILE, ENFILE, ENOBUFS...): hold fewer connections for a while, so
        the loop thread keeps descriptors for its journal and stage, and evict idle ones to get
        there; the kernel keeps the waiting clients queued meanwhile."""
        self._pressure_at = time.monotonic()
        self.cap = max(MIN_CONNECTIONS, len(self.conns) - 2 * ACCEPT_BATCH)
        evicted = 0
        while len(self.conns) > self.cap and self.evict():
            evicted += 1
        self.note("accept", f"heidi daemon: API accept: {exc.strerror or exc}; holding at most "
                  f"{self.cap} connections for now")
        # evicted sockets close on the loop's next pass: retry right after it, else back off
        self._pause_accepting(ACCEPT_SETTLE_S if evicted else ACCEPT_BACKOFF_S)

    def _made(self, conn: _Conn, sock: socket.socket, task: asyncio.Task) -> None:
        conn.task = None
        if task.cancelled() or task.exception() is not None:
            conn.state = "closed"
            self.forget(conn)
            sock.close()
            exc = None if task.cancelled() else task.exception()
            if exc is not None:
                self.note("connect", f"heidi daemon: API connection: {one_line(exc)}")

    def forget(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        self.idle_conns.pop(conn, None)
        if not self._accepting and self._resume is None and len(self.conns) < self.cap:
            self._start_accepting()

    def _sweep(self) -> None:
        loop = self._loop
        if loop is None or self._shutdown.is_set():
            return
        loop.call_later(SWEEP_S, self._sweep)
        now = time.monotonic()
        if self.cap < self.cap_max and now - self._pressure_at > PRESSURE_HOLD_S:
            self.cap = min(self.cap_max, self.cap + ACCEPT_BATCH)
            if not self._accepting and self._resume is None:
                self._start_accepting()
        for conn in [c for c in self.conns if c.deadline <= now and c.state != "busy"]:
            conn.expire()

    # -- the workers: handlers read the disk there, never on the server's thread ----------------
    def submit(self, conn: _Conn, request: Request) -> None:
        loop = self._loop
        assert loop is not None
        if len(self._threads) < self._workers:
            # started on first use, after the stage watchdog forked; daemon threads, so a
            # handler stuck in the kernel never holds the process at exit
            thread = threading.Thread(target=self._work, name=f"heidi-api-{len(self._threads)}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        self._jobs.put((loop, conn, request))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, conn, request = job
            try:
                resp = self.handler(request)
            except BaseException as exc:  # the handler answers its own errors; this is a bug
                self.note("handler", f"heidi daemon: {request.method} request failed: {one_line(exc)}")
                resp = error_response(500, "internal error; see the daemon log")
            try:
                loop.call_soon_threadsafe(conn.respond, request, resp)
            except RuntimeError:
                pass  # the server stopped meanwhile
