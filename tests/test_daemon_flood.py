"""The daemon's API cannot take the loop down (issue 9, items 1 and 7): a connection flood under a
lowered NOFILE during a real stage, the whole-request deadline, idle keep-alive connections, bad
framing, fd exhaustion at accept, and the API token's rule. Loopback only; every process is ended
by pid in a finalizer.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from heidi.config import Config
from heidi.errors import ConfigError
from helpers_loop import REPO
from test_daemon import TOKEN, Daemon, daemon_env, get_json, heidi, request

FLOOD = 1100


def _lowered(soft: int, hard: int | None = None):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft if hard is None else hard))
    return preexec


class LimitedDaemon(Daemon):
    """A foreground `heidi daemon` started under a NOFILE limit of the test's choosing."""

    def __init__(self, tmp_path, env: dict[str, str], *extra: str, preexec=None) -> None:
        self.tmp = str(tmp_path)
        self.out = os.path.join(self.tmp, "out")
        self.env = env
        self.stderr_path = os.path.join(self.tmp, f"daemon-{time.monotonic_ns()}.err")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "heidi", "daemon", "--port", "0", "--out-dir", self.out, *extra],
            env=env, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._err, start_new_session=True, preexec_fn=preexec)
        self.port = 0


@pytest.fixture
def limited_daemon(tmp_path):
    started: list[Daemon] = []

    def start(env: dict[str, str], *extra: str, preexec=None) -> LimitedDaemon:
        d = LimitedDaemon(tmp_path, env, *extra, preexec=preexec)
        started.append(d)
        d.wait_listening()
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def many_fds():
    """Room in this process for the flood's sockets; the limit is put back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard NOFILE limit ({hard}) leaves no room for {FLOOD} test sockets")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _flood(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5.0)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            raise
        socks.append(s)
    return socks


def _timed_status(port: int) -> float:
    started = time.monotonic()
    code, view = get_json(port, "/api/v1/status", timeout=5.0)
    elapsed = time.monotonic() - started
    assert code == 200 and view["run_id"], view
    return elapsed


def _read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response off a raw socket (Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closes (EOF or reset), None if it is still open after timeout."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return time.monotonic() - started
    except (ConnectionResetError, BrokenPipeError):
        return time.monotonic() - started
    except TimeoutError:
        return None


# -- the flood: a real stage under NOFILE 1024 --------------------------------------------------

def test_a_connection_flood_does_not_stop_the_loop(limited_daemon, many_fds, tmp_path):
    data = tmp_path / "out" / "data"
    (tmp_path / "heidi.toml").write_text(textwrap.dedent("""\
        [stages.generate]
        command = ["{python}", "-c", "import sys, time; time.sleep(8); open(sys.argv[1], 'w').write('{}')",
                   "{data_dir}/raw_round_{round}.jsonl"]
        [stages.validate]
        command = ["{python}", "-c", "pass"]
        """))
    env = daemon_env(HEIDI_MOCK_SUBPROCESSES=None, HEIDI_PYTHON=sys.executable, MAX_CPU_PCT="100",
                     MAX_MEM_PCT="100", HEIDI_KILL_GRACE_S="1")
    # soft = hard = 1024: the daemon cannot raise it; its connection cap and eviction must hold
    d = limited_daemon(env, "--config", str(tmp_path / "heidi.toml"), preexec=_lowered(1024))
    d.wait_status(lambda v: v["state"] == "COLLECTING" and v["stage_status"] == "running",
                  what="generate running")
    socks: list[socket.socket] = []
    try:
        socks = _flood(d.port, FLOOD)
        assert d.proc.poll() is None, d.stderr()
        # a fresh client is answered at once, however many idle connections are open
        times = [_timed_status(d.port) for _ in range(5)]
        assert max(times) < 1.0, times
        view = d.status()
        assert view["state"] == "COLLECTING" and view["stage_status"] == "running"
        # a second wave while the first is still open
        socks += _flood(d.port, 200)
        assert _timed_status(d.port) < 1.0
        assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) < 1024
        # the daemon closed the oldest idle connections to stay under its cap (1024 - 128)
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLIN)
        closed = {fd for fd, _ in poller.poll(2000)}
        assert len(socks) - len(closed) <= 1024 - 128, len(closed)
        assert socks[0].fileno() in closed and socks[-1].fileno() not in closed
    finally:
        for s in socks:
            s.close()
    # the stage completes, the loop moves on, and the daemon is alive and answering
    d.wait_status(lambda v: v["state"] == "IDLE" and v["status"] == "idle", timeout=30,
                  what="round 1 collected")
    assert (data / "raw_round_1.jsonl").read_text() == "{}"
    kinds = [(e["event_type"], e.get("stage")) for e in d.journal()]
    assert ("script_success", "generate") in kinds and ("script_success", "validate") in kinds
    assert d.proc.poll() is None
    assert "Too many open files" not in d.stderr()
    assert d.terminate() == 0
    done = heidi(["verify", "--out-dir", d.out], daemon_env(), str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


# -- deadlines, keep-alive, framing ---------------------------------------------------------------

def test_request_deadline_keepalive_and_framing(limited_daemon, tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    env = daemon_env(HEIDI_API_REQUEST_TIMEOUT_S="2")
    d = limited_daemon(env, preexec=_lowered(256, hard))
    # the soft NOFILE limit was raised to the hard one at start-up
    with open(f"/proc/{d.proc.pid}/limits") as fh:
        line = next(x for x in fh if x.startswith("Max open files"))
    expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert line.split()[3] == expected, line
    port = d.port

    # a client sending one byte a second is cut at the deadline, answered 408
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        payload = b"GET /api/v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        started = time.monotonic()
        answer = b""
        for byte in payload:
            try:
                slow.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            ready, _, _ = select.select([slow], [], [], 1.0)
            if ready:
                answer = slow.recv(65536)
                break
        elapsed = time.monotonic() - started
        assert 1.5 < elapsed < 4.0, elapsed
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"Connection: close" in answer and b'"error"' in answer
        assert _closed_within(slow, 3.0) is not None
    finally:
        slow.close()

    # keep-alive works, and an idle kept-alive connection is closed after min(5 s, the deadline)
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        for _ in range(2):
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            code, headers, body = _read_response(conn)
            assert code == 200 and orjson.loads(body) == {"ok": True}
            assert "connection" not in headers and headers["server"].startswith("heidi/")
        closed = _closed_within(conn, 5.0)
        assert closed is not None and closed < 3.5, closed
    finally:
        conn.close()

    # a connection that never sends is closed at the deadline, without an answer
    mute = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        mute.settimeout(5.0)
        started = time.monotonic()
        assert mute.recv(100) == b""
        assert time.monotonic() - started < 3.5
    finally:
        mute.close()

    # pipelined requests, garbage, folded headers: 400 and closed; nothing runs
    for raw, code in ((b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n", 400),
                      (b"POST /api/v1/action/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                       b"GET / HTTP/1.1\r\n\r\n", 400),
                      (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
                      (b"GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
                      (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
                      (b"BREW /healthz HTTP/1.1\r\n\r\n", 501),
                      (b"POST /api/v1/action/pause HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
                      (b"GET /" + b"a" * 70_000, 414),
                      (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 9000, 431)):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(raw)
            got, headers, body = _read_response(s)
            assert got == code, (raw[:60], got, body)
            assert headers["connection"] == "close" and orjson.loads(body)["error"]
            assert _closed_within(s, 3.0) is not None
        finally:
            s.close()
    assert not d.status()["paused"] and not d.status()["pending_requests"]

    # HTTP/1.0 closes after the answer; HEAD has the length but no body; 100-continue
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"HEAD /api/v1/status HTTP/1.0\r\n\r\n")
        code, headers, body = _read_response(s)
        assert code == 200 and int(headers["content-length"]) > 0 and body == b""
        assert headers["connection"] == "close" and _closed_within(s, 3.0) is not None
    finally:
        s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"POST /api/v1/action/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"{}")
        code, _, body = _read_response(s)
        assert code == 202 and orjson.loads(body) == {"action": "pause", "result": "queued"}
    finally:
        s.close()
    d.wait_status(lambda v: v["paused"], what="paused")
    assert d.terminate() == 0


# -- fd exhaustion at accept: evict, back off, never crash ----------------------------------------

SERVER_SCRIPT = """
import resource, sys, threading, time
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from heidi.daemon.server import HttpServer
from heidi.daemon.http1 import Response
log = lambda line: print(line, file=sys.stderr, flush=True)
server = HttpServer("127.0.0.1", 0, lambda req: Response(200, b"{}", "application/json"), log,
                    "heidi/test", 10.0, max_connections=1000)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
server.shutdown()
server.server_close()
print("bye", flush=True)
"""


def test_fd_exhaustion_at_accept_evicts_and_serves(tmp_path):
    # a cap far above what NOFILE allows: accept() itself hits EMFILE and must cope
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], cwd=str(tmp_path),
                            env={**os.environ, "PYTHONPATH": REPO}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    socks: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        socks = _flood(port, 150)
        for _ in range(3):
            started = time.monotonic()
            code, _, body = request(port, "GET", "/x", timeout=5.0)
            assert code == 200 and body == b"{}"
            assert time.monotonic() - started < 1.0
        for s in socks:
            s.close()
        socks = []
        assert proc.poll() is None
        out, err = proc.communicate(b"", timeout=15)
        assert proc.returncode == 0 and out.strip() == b"bye", err
        lines = err.decode().splitlines()
        assert any("accept: Too many open files" in line for line in lines), lines
        assert len(lines) <= 3, lines  # throttled: one line per kind per 10 s
    finally:
        for s in socks:
            s.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# -- item 7: the token is printable ASCII, or heidi does not start --------------------------------

@pytest.mark.parametrize("token, problem", [
    ("tökentökentökentöken", "non-ASCII"),
    ("token with spaces in it", "space"),
    ("short", "5 characters"),
    ("   ", "empty"),
    ("", "empty"),
])
def test_a_bad_token_is_refused_at_start_up(tmp_path, token, problem):
    out = tmp_path / "out"
    done = heidi(["daemon", "--port", "0", "--out-dir", str(out)],
                 daemon_env(HEIDI_API_TOKEN=token), str(tmp_path))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HEIDI_API_TOKEN" in lines[0] and problem in lines[0], lines
    assert "printable ASCII" in lines[0]
    assert token.strip() == "" or token not in lines[0]  # never echoed
    assert not out.exists()
    with pytest.raises(ConfigError, match="HEIDI_API_TOKEN"):
        Config.load(None, environ={"HEIDI_API_TOKEN": token, "OUT_DIR": str(out)})


def test_token_rule_and_request_timeout_setting(tmp_path):
    cfg = Config.load(None, environ={"HEIDI_API_TOKEN": f"  {TOKEN}\n", "OUT_DIR": str(tmp_path)})
    assert cfg.api_token == TOKEN and cfg.api_request_timeout_s == 10.0
    visible = "".join(chr(c) for c in range(0x21, 0x7f))
    assert Config.load(None, environ={"HEIDI_API_TOKEN": visible}).api_token == visible
    assert Config.load(None, environ={"HEIDI_API_REQUEST_TIMEOUT_S": "2.5"}).api_request_timeout_s == 2.5
    for bad in ("0", "-1", "abc", "3601"):
        with pytest.raises(ConfigError, match="HEIDI_API_REQUEST_TIMEOUT_S"):
            Config.load(None, environ={"HEIDI_API_REQUEST_TIMEOUT_S": bad})
    # a token straight from undecodable bytes in the environment (surrogate escapes)
    with pytest.raises(ConfigError, match="non-ASCII"):
        Config.load(None, environ={"HEIDI_API_TOKEN": "abcdefghijklmnop\udcff"})


def test_with_a_token_an_unauthenticated_slow_client_is_cut(limited_daemon, tmp_path):
    """With a token set, an unauthenticated slow client is cut just the same."""
    d = limited_daemon(daemon_env(HEIDI_API_TOKEN=TOKEN, HEIDI_API_REQUEST_TIMEOUT_S="1"))
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    try:
        s.sendall(b"GET /api/v1/status HTTP/1.1\r\n")
        code, headers, _ = _read_response(s, timeout=4.0)
        assert code == 408 and headers["connection"] == "close"
    finally:
        s.close()
    assert d.status()["mode"] == "collect"
    assert d.terminate() == 0
    assert TOKEN not in d.stderr()
