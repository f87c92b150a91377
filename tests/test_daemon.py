"""`heidi daemon` end to end: a real daemon process, its HTTP API on 127.0.0.1 (port 0), signals,
--detach, the token, and the HTTP side staying responsive while a real stage runs (design.md §8).

Every daemon a test starts is killed in a finalizer, whatever happens.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from helpers_loop import ENV_SETTINGS, REPO

TOKEN = "t0ken-for-tests-7c1f9e"
# Settings a developer's shell might export; the tests pin their own.
_SCRUB = ENV_SETTINGS + ("HEIDI_HOST", "HEIDI_PORT", "HEIDI_API_TOKEN", "HEIDI_PYTHON",
                         "MAX_CPU_PCT", "MAX_MEM_PCT", "HEIDI_KILL_GRACE_S", "HEIDI_STAGE_TIMEOUT_S")
METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
                         r'(-?[0-9.eE+-]+|NaN|[+-]Inf)$')


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(PYTHONPATH=REPO, HEIDI_MOCK_SUBPROCESSES="1", HEIDI_MODE="collect", ROUNDS="2",
               HEIDI_FSYNC="0")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def heidi(args: list[str], env: dict[str, str], cwd: str,
          timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", *args], env=env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


def wait_for(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie nobody reaps (reparented in a container without init) is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Content-Type") or "", data
    finally:
        conn.close()


def get_json(port: int, path: str, **kw):
    status, ctype, data = request(port, "GET", path, **kw)
    assert ctype.startswith("application/json"), (status, ctype, data)
    return status, orjson.loads(data)


class Daemon:
    """A foreground `heidi daemon` in its own process group; stderr goes to a file."""

    def __init__(self, tmp_path, env: dict[str, str], *extra: str, out: str = "out") -> None:
        self.tmp = str(tmp_path)
        self.out = os.path.join(self.tmp, out)
        self.env = env
        self.stderr_path = os.path.join(self.tmp, f"daemon-{time.monotonic_ns()}.err")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "heidi", "daemon", "--port", "0", "--out-dir", self.out, *extra],
            env=env, cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._err, start_new_session=True)
        self.port = 0

    def wait_listening(self, timeout: float = 15.0) -> int:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            match = re.search(r"heidi daemon listening on http://127\.0\.0\.1:(\d+)", self.stderr())
            return int(match.group(1)) if match else 0
        self.port = wait_for(ready, timeout, "the daemon to listen")
        info = orjson.loads(open(os.path.join(self.out, "daemon.json"), "rb").read())
        assert info["port"] == self.port and info["pid"] == self.proc.pid
        return self.port

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def status(self) -> dict:
        code, view = get_json(self.port, "/api/v1/status", headers=self.headers())
        assert code == 200, view
        return view

    def headers(self) -> dict[str, str]:
        token = self.env.get("HEIDI_API_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, action: str):
        code, _, data = request(self.port, "POST", f"/api/v1/action/{action}", headers=self.headers())
        return code, orjson.loads(data)

    def wait_status(self, pred, timeout: float = 10.0, what: str = "status"):
        return wait_for(lambda: (lambda v: v if pred(v) else None)(self.status()), timeout, what)

    def terminate(self, timeout: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._err.close()

    def journal(self) -> list[dict]:
        with open(os.path.join(self.out, "events.jsonl"), "rb") as fh:
            return [orjson.loads(line) for line in fh]


@pytest.fixture
def start_daemon(tmp_path):
    started: list[Daemon] = []

    def start(env: dict[str, str] | None = None, *extra: str, out: str = "out",
              listen: bool = True) -> Daemon:
        d = Daemon(tmp_path, env or daemon_env(), *extra, out=out)
        started.append(d)
        if listen:
            d.wait_listening()
        return d

    yield start
    for d in started:
        d.kill()


# -- the API over a collect-mode run ------------------------------------------------------------

def test_collect_mode_run_through_the_api(start_daemon, tmp_path):
    d = start_daemon()
    view = d.wait_status(lambda v: v["state"] == "IDLE" and v["status"] == "idle", what="IDLE")
    for key in ("state", "round", "mode", "run_id", "status", "stage", "paused"):
        assert key in view
    assert view["mode"] == "collect" and view["round"] == 1 and view["run_id"]

    # pause / resume
    assert d.post("pause") == (202, {"action": "pause", "result": "queued"})
    d.wait_status(lambda v: v["paused"] and v["status"] == "paused", what="paused")
    assert d.post("resume")[0] == 202
    d.wait_status(lambda v: not v["paused"] and v["status"] == "idle", what="resumed")
    code, body = d.post("resume")
    assert code == 409 and "not paused" in body["error"] and "\n" not in body["error"]

    # train-now moves the run on: round 2 waits in IDLE again, then the run completes
    assert d.post("train_now") == (202, {"action": "train_now", "result": "queued"})
    d.wait_status(lambda v: v["round"] == 2 and v["state"] == "IDLE" and v["status"] == "idle",
                  what="round 2 IDLE")
    assert d.post("train-now")[0] == 202
    d.wait_status(lambda v: v["status"] == "completed", what="completed")
    code, body = d.post("train_now")
    assert code == 409 and body["error"]
    assert d.post("stop")[0] == 409

    # events: pagination over the whole journal
    lines = d.journal()
    code, page = get_json(d.port, "/api/v1/events?since=0&limit=5")
    assert code == 200 and page["next"] == 5 and len(page["events"]) == 5
    assert page["events"][0]["event_type"] == "pipeline_start"
    code, rest = get_json(d.port, "/api/v1/events?since=5&limit=100000")
    assert code == 200 and rest["next"] == len(lines)
    assert page["events"] + rest["events"] == lines
    code, default = get_json(d.port, "/api/v1/events")
    assert default["events"] == lines[:100] and default["next"] == min(100, len(lines))
    code, tail = get_json(d.port, f"/api/v1/events?since={len(lines)}")
    assert code == 200 and tail == {"events": [], "next": len(lines)}
    assert get_json(d.port, "/api/v1/events?since=-1")[0] == 400
    assert get_json(d.port, "/api/v1/events?limit=abc")[0] == 400

    # metrics: valid exposition format
    code, ctype, data = request(d.port, "GET", "/metrics")
    assert code == 200 and ctype.startswith("text/plain; version=0.0.4")
    text = data.decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* \S", line), line
            continue
        assert METRIC_LINE.match(line), line
        name_labels, value = line.rsplit(" ", 1)
        samples[name_labels] = float(value)
    assert samples["heidi_round"] == 2 and samples["heidi_rounds"] == 2
    assert samples['heidi_state{state="IDLE"}'] == 1 and samples['heidi_state{state="ERROR"}'] == 0
    assert samples["heidi_paused"] == 0 and samples["heidi_events_total"] == len(lines)
    # usage: sums as counters, percentages per stage as gauges (mock stages carry cpu_pct, wall_ms)
    assert "# TYPE heidi_stage_wall_seconds_total counter" in text
    assert "# TYPE heidi_stage_cpu_percent gauge" in text
    assert 'heidi_stage_cpu_percent{stage="train"}' in samples
    assert not any(k.startswith("heidi_usage") for k in samples)

    # health, page, errors
    assert get_json(d.port, "/healthz") == (200, {"ok": True})
    code, ctype, page_html = request(d.port, "GET", "/")
    assert code == 200 and ctype.startswith("text/html")
    assert b"<html" in page_html and b"/api/v1/action/" in page_html
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page_html)  # no external assets
    code, body = get_json(d.port, "/nope")
    assert code == 404 and body["error"]
    code, _, data = request(d.port, "GET", "/api/v1/action/stop")
    assert code == 405 and orjson.loads(data)["error"]
    code, _, data = request(d.port, "POST", "/api/v1/status")
    assert code == 405
    code, _, data = request(d.port, "POST", "/api/v1/action/pause", body=b"x" * (70 * 1024))
    assert code == 413 and orjson.loads(data)["error"]
    code, _, data = request(d.port, "POST", "/api/v1/action/nope")
    assert code == 404
    # a web page cannot drive the API: foreign Host (DNS rebinding) and cross-site POSTs
    code, _, _ = request(d.port, "GET", "/api/v1/status", headers={"Host": "evil.example:80"})
    assert code == 403
    code, _, _ = request(d.port, "POST", "/api/v1/action/stop",
                         headers={"Origin": "http://evil.example"})
    assert code == 403

    # a completed run is left as it is by SIGTERM
    assert d.terminate() == 0
    assert d.journal()[-1]["event_type"] == "pipeline_complete"
    assert not os.path.exists(os.path.join(d.out, "daemon.json"))


def test_a_daemon_given_a_completed_run_id_serves_it_and_starts_nothing(start_daemon, tmp_path):
    """A unit restarted after its run completed (RUN_ID fixed in its environment): the daemon
    listens and shows the completed run, journals nothing and exits 0 on SIGTERM, here and once
    the run is archived by a later run -- as `heidi run` does; it never starts the run again."""
    env = daemon_env(HEIDI_MODE="full", ROUNDS="1", RUN_ID="run_fixed_id")
    d = start_daemon(env)
    d.wait_status(lambda v: v["status"] == "completed", what="completed")
    assert d.terminate() == 0
    before = d.journal()
    again = start_daemon(env)
    view = again.wait_status(lambda v: v["status"] == "completed", what="the completed run")
    assert view["run_id"] == "run_fixed_id"
    time.sleep(0.5)  # a loop that would start the run again has had its chance
    assert again.journal() == before
    assert "run run_fixed_id already completed" in again.stderr()
    assert again.terminate() == 0
    # archived by another run: still nothing started under the old id
    other = start_daemon(daemon_env(HEIDI_MODE="full", ROUNDS="1", RUN_ID="run_other"))
    other.wait_status(lambda v: v["status"] == "completed" and v["run_id"] == "run_other",
                      what="the other run")
    assert other.terminate() == 0
    third = start_daemon(env)
    assert "already completed" in third.stderr() and "runs/run_fixed_id" in third.stderr()
    assert third.status()["run_id"] == "run_other"
    assert third.terminate() == 0


def test_sigterm_ends_the_process_not_the_run(start_daemon, tmp_path):
    """SIGTERM (or SIGINT) to a daemon waiting in collect mode: it exits 0, the lock is free, the
    run is untouched (no pipeline_stop), and the next daemon takes up the same run."""
    d = start_daemon()
    view = d.wait_status(lambda v: v["state"] == "IDLE" and v["status"] == "idle", what="IDLE")
    before = d.journal()
    assert d.terminate() == 0
    assert d.journal() == before  # nothing journaled: the run was only waiting
    from heidi.lock import lock_holder
    assert lock_holder(os.path.join(d.out, "heidi.lock")) is None
    state = orjson.loads(open(os.path.join(d.out, "state.json"), "rb").read())
    assert state["status"] == "idle"
    done = heidi(["verify", "--out-dir", d.out], daemon_env(), str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGTERM" in d.stderr()

    d2 = start_daemon()
    again = d2.wait_status(lambda v: v["state"] == "IDLE" and v["status"] == "idle", what="IDLE")
    assert again["run_id"] == view["run_id"]
    assert not os.path.exists(os.path.join(d.out, "runs"))
    d2.proc.send_signal(signal.SIGINT)
    assert d2.proc.wait(15) == 0
    assert [e["event_type"] for e in d2.journal()].count("pipeline_start") == 1


def test_token_required(start_daemon, tmp_path):
    d = start_daemon(daemon_env(HEIDI_API_TOKEN=TOKEN))
    code, body = get_json(d.port, "/api/v1/status")
    assert code == 401 and body["error"]
    assert get_json(d.port, "/api/v1/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert get_json(d.port, "/api/v1/status", headers={"Authorization": TOKEN})[0] == 401
    code, view = get_json(d.port, "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and view["mode"] == "collect"
    assert get_json(d.port, "/healthz") == (200, {"ok": True})
    assert request(d.port, "GET", "/metrics")[0] == 401
    assert request(d.port, "POST", "/api/v1/action/stop")[0] == 401
    code, ctype, data = request(d.port, "GET", "/")
    assert code == 401 and ctype.startswith("text/html") and b"/?token=" in data  # a page, not JSON
    assert request(d.port, "GET", f"/?token={TOKEN}")[0] == 303  # the cookie: tests/test_page.py
    assert request(d.port, "GET", "/?token=nope")[0] == 401
    assert d.terminate() == 0
    assert TOKEN not in d.stderr()


def test_non_loopback_without_token_is_refused(tmp_path):
    out = tmp_path / "out"
    done = heidi(["daemon", "--host", "0.0.0.0", "--port", "0", "--out-dir", str(out)],
                 daemon_env(), str(tmp_path))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "HEIDI_API_TOKEN" in done.stderr
    assert not out.exists()


def test_second_daemon_on_the_same_run_exits_75(start_daemon, tmp_path):
    first = start_daemon()
    done = heidi(["daemon", "--port", "0", "--out-dir", first.out], daemon_env(), str(tmp_path))
    assert done.returncode == 75
    assert len(done.stderr.strip().splitlines()) == 1
    assert first.status()["holder_pid"] == first.proc.pid


def test_detach(tmp_path):
    out = tmp_path / "out"
    pid_file = out / "heidi.pid"
    pid = None
    try:
        done = heidi(["daemon", "--detach", "--port", "0", "--out-dir", str(out)], daemon_env(),
                     str(tmp_path))
        assert done.returncode == 0, done.stderr
        pid = int(pid_file.read_text().split()[0])
        assert _alive(pid)
        assert oct(pid_file.stat().st_mode & 0o777) == "0o600"
        assert oct((out / "daemon.log").stat().st_mode & 0o777) == "0o600"
        info = orjson.loads((out / "daemon.json").read_bytes())
        assert info["pid"] == pid and f":{info['port']}" in done.stderr
        code, view = get_json(info["port"], "/api/v1/status")
        assert code == 200 and view["holder_pid"] == pid and view["mode"] == "collect"
        # a second detached daemon reports the held run through its parent
        again = heidi(["daemon", "--detach", "--port", "0", "--out-dir", str(out)], daemon_env(),
                      str(tmp_path))
        assert again.returncode == 75 and len(again.stderr.strip().splitlines()) == 1
        assert int(pid_file.read_text().split()[0]) == pid
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), 15, "the detached daemon to exit")
        assert not pid_file.exists()
        assert "listening on" in (out / "daemon.log").read_text()
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- a real stage: HTTP answers while it runs, and a stop ends it ----------------------------------

def test_http_responsive_while_a_stage_runs_and_stop_ends_it(start_daemon, tmp_path):
    (tmp_path / "heidi.toml").write_text(textwrap.dedent("""\
        [stages.generate]
        command = ["{python}", "-c", "import time; time.sleep(30)"]
        """))
    env = daemon_env(HEIDI_MOCK_SUBPROCESSES=None, HEIDI_PYTHON=sys.executable, MAX_CPU_PCT="100",
                     MAX_MEM_PCT="100", HEIDI_KILL_GRACE_S="1")
    d = start_daemon(env, "--config", str(tmp_path / "heidi.toml"))
    d.wait_status(lambda v: v["state"] == "COLLECTING" and v["stage_status"] == "running",
                  what="generate running")
    for _ in range(20):
        started = time.monotonic()
        code, view = get_json(d.port, "/api/v1/status", timeout=1.0)
        assert code == 200 and view["state"] == "COLLECTING"
        assert time.monotonic() - started < 1.0
        time.sleep(0.05)
    code, body = d.post("train_now")  # not waiting in IDLE
    assert code == 409 and "IDLE" in body["error"]
    started = time.monotonic()
    assert d.post("stop")[0] == 202
    d.wait_status(lambda v: v["status"] == "stopped", timeout=10, what="stopped")
    assert time.monotonic() - started < 1.0 + 1.0 + 1.5  # grace + 1 s, and some slack
    events = d.journal()
    assert events[-1]["event_type"] == "pipeline_stop" and events[-1]["stage"] == "generate"
    assert d.terminate() == 0
    assert d.journal()[-1]["event_type"] == "pipeline_stop"  # nothing more to stop
    done = heidi(["verify", "--out-dir", d.out], daemon_env(), str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr

    # a stopped run goes on with `heidi continue`: the next daemon takes up the same run_id and
    # generate runs again; SIGTERM then ends the stage, journals a warn (not pipeline_stop) and
    # exits 0 within grace + 1 s or so, leaving the run interrupted
    done = heidi(["continue", "--out-dir", d.out], daemon_env(), str(tmp_path))
    assert done.returncode == 0 and "continuing" in done.stdout, done.stdout + done.stderr
    d2 = start_daemon(env, "--config", str(tmp_path / "heidi.toml"))
    view = d2.wait_status(lambda v: v["state"] == "COLLECTING" and v["stage_status"] == "running",
                          what="generate running again")
    assert view["run_id"] == events[0]["run_id"]
    started = time.monotonic()
    assert d2.terminate() == 0
    assert time.monotonic() - started < 1.0 + 1.0 + 1.5
    journal = d2.journal()
    kinds = [e["event_type"] for e in journal]
    assert kinds[-3:] == ["pipeline_continue", "stage_start", "pipeline_interrupted"]
    assert journal[-1]["stage"] == "generate" and "SIGTERM" in journal[-1]["message"]
    status = heidi(["status", "--json", "--out-dir", d2.out], daemon_env(), str(tmp_path))
    view = orjson.loads(status.stdout)
    assert view["status"] == "interrupted" and view["interrupted"] is True
    done = heidi(["verify", "--out-dir", d2.out], daemon_env(), str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
