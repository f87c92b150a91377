"""The daemon's status page: the token cookie (a reload keeps working, the token leaves the address
bar), per-action applicability in /api/v1/status, and the page itself driven in a real headless
Chromium over the DevTools protocol (aiohttp's websocket client): live values of a running stage,
buttons disabled with their reason, a real click, the Stop confirmation, the banner while the
daemon does not answer, and a screenshot. Skipped, saying why, where Chromium is not installed
(.ci/run installs it)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time

import pytest

from test_daemon import TOKEN, Daemon, daemon_env, get_json, request, wait_for

CHROMIUM = os.environ.get("HEIDI_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _slow_stage_env(tmp_path, **extra: str) -> dict[str, str]:
    """A full run whose generate stage prints two lines, then waits for tmp_path/release."""
    release = tmp_path / "release"
    toml = tmp_path / "heidi.toml"
    toml.write_text(textwrap.dedent(f"""
        rounds = 1
        [stages.generate]
        command = ["/bin/sh", "-c", "echo starting; echo 'key ghp_{'B' * 36} step 3/10'; while [ ! -e {release} ]; do sleep 0.1; done; exit 3"]
    """))
    return daemon_env(HEIDI_CONFIG=str(toml), HEIDI_MOCK_SUBPROCESSES="0", HEIDI_MODE="full",
                      MAX_CPU_PCT="100", MAX_MEM_PCT="100", HEIDI_KILL_GRACE_S="1", **extra)


@pytest.fixture
def daemons(tmp_path):
    started: list[Daemon] = []

    def start(env: dict[str, str], *extra: str) -> Daemon:
        d = Daemon(tmp_path, env, *extra)
        started.append(d)
        d.wait_listening()
        return d
    yield start
    (tmp_path / "release").touch()
    for d in started:
        d.kill()


def _cookie_of(port: int, token: str) -> tuple[int, dict[str, str]]:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/?token={token}")
        resp = conn.getresponse()
        resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        conn.close()


def test_page_opened_with_token_sets_a_cookie_and_drops_the_token(daemons, tmp_path):
    d = daemons(daemon_env(HEIDI_API_TOKEN=TOKEN))
    code, headers = _cookie_of(d.port, TOKEN)
    assert code == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("heidi_token=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = cookie.split(";", 1)[0]
    assert _cookie_of(d.port, "wrong-token-0123456789")[0] == 401  # no cookie for a wrong token
    # a reload of / and the page's own requests carry the cookie
    code, ctype, page = request(d.port, "GET", "/", headers={"Cookie": jar})
    assert code == 200 and ctype.startswith("text/html") and b"/api/v1/action/" in page
    assert get_json(d.port, "/api/v1/status", headers={"Cookie": jar})[0] == 200
    assert request(d.port, "GET", "/", headers={"Cookie": "heidi_token=nope"})[0] == 401
    # POSTs: same origin only; a cookie POST must say its origin (a browser always does)
    origin = f"http://127.0.0.1:{d.port}"
    code, _, body = request(d.port, "POST", "/api/v1/action/pause",
                            headers={"Cookie": jar, "Origin": origin})
    assert code == 202, body
    code, _, _ = request(d.port, "POST", "/api/v1/action/pause",
                         headers={"Cookie": jar, "Origin": "http://evil.example"})
    assert code == 403
    assert request(d.port, "POST", "/api/v1/action/stop", headers={"Cookie": jar})[0] == 403
    assert TOKEN not in d.stderr()


def test_status_says_which_actions_apply_and_why_not(daemons):
    d = daemons(daemon_env())  # collect mode, mock stages: waits in IDLE for train-now
    view = d.wait_status(lambda v: v["state"] == "IDLE" and v["status"] == "idle", what="IDLE")
    actions = view["actions"]
    assert set(actions) == {"stop", "pause", "resume", "train_now", "continue"}
    assert actions["train_now"] is None and actions["stop"] is None and actions["pause"] is None
    assert actions["resume"].endswith("nothing to resume")
    assert "only a run in ERROR or stopped can continue" in actions["continue"]
    for action, reason in actions.items():  # the reason is what POSTing it answers
        if reason is not None and not reason.endswith("nothing to resume"):
            code, body = d.post(action)
            assert code == 409 and body["error"] == reason


# -- the page in a real browser ------------------------------------------------------------------

class _Cdp:
    """A minimal DevTools protocol client on one page target (aiohttp's websocket client)."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=30)).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 20.0, what: str = ""):
        end = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while time.monotonic() < end:  # the page may still be loading: an error is "not yet"
            value = await self.js(guarded)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or expression}; page: "
                             + str(await self.js("document.body.innerText")))

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element, as a user makes it."""
        box = await self.js(f"(r => r && [r.x + r.width / 2, r.y + r.height / 2])"
                            f"(document.querySelector({json.dumps(selector)})?.getBoundingClientRect())")
        assert box, f"no element {selector}"
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1],
                            button="left", clickCount=1)


def _start_chromium(profile: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1100,1000", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    port_file = os.path.join(profile, "DevToolsActivePort")
    port = wait_for(lambda: ((os.path.exists(port_file) and open(port_file).read().split("\n")[0].strip())
                             or (proc.poll() is not None and "exited")), 30, "Chromium's DevTools port")
    if port == "exited":
        raise AssertionError(f"chromium exited {proc.returncode}")
    return proc, int(port)


def _reap_group(pgid: int, timeout_s: float = 10.0) -> None:
    """Wait for Chromium's helper processes: this process may be a child subreaper (heidi's
    supervision makes it one), and then they are re-parented here when Chromium dies, to be
    left as zombies unless waited for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return  # none left in the group that is ours to wait for
        if pid == 0:
            time.sleep(0.05)  # killed, not yet gone


async def _drive(cdp_port: int, daemon: Daemon, tmp_path, restart) -> dict:
    import aiohttp
    seen: dict = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{cdp_port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Cdp(ws)
            await cdp.call("Page.enable")
            base = f"http://127.0.0.1:{daemon.port}/"
            await cdp.call("Page.navigate", url=f"{base}?token={TOKEN}")
            # live values of the running stage
            await cdp.until("document.getElementById('log').textContent.includes('step 3/10')",
                            what="the stage's log tail")
            seen["url"] = await cdp.js("location.href")
            first = await cdp.until("(t => t !== '-' && t)(document.getElementById('stage_elapsed').textContent)")
            await asyncio.sleep(2.2)
            seen["elapsed"] = (first, await cdp.js("document.getElementById('stage_elapsed').textContent"))
            seen["log"] = await cdp.js("document.getElementById('log').textContent")
            seen["holder"] = await cdp.js("document.getElementById('holder').textContent")
            seen["stage_log"] = await cdp.js("document.getElementById('stage_log').textContent")
            # a reload keeps working: the cookie, not the (gone) query, lets it in
            await cdp.call("Page.reload")
            await cdp.until("document.getElementById('run_id').textContent.startsWith('run_')",
                            what="the page after a reload")
            buttons = "Object.fromEntries([...document.querySelectorAll('button[data-a]')]" \
                      ".map(b => [b.dataset.a, [b.disabled, b.title]]))"
            await cdp.until("!document.querySelector('button[data-a=stop]').disabled")
            seen["buttons"] = await cdp.js(buttons)
            # a real click on Pause: queued for the loop (a stage is running)
            await cdp.click("button[data-a=pause]")
            await cdp.until("document.getElementById('pending').textContent.includes('pause')",
                            what="the pause request")
            seen["msg_after_pause"] = await cdp.js("document.getElementById('msg').textContent")
            seen["buttons_after_pause"] = await cdp.js(buttons)
            # Stop asks first; Cancel sends nothing
            await cdp.click("button[data-a=stop]")
            seen["confirm_shown"] = await cdp.js("getComputedStyle(document.getElementById('confirm')).display")
            shot = await cdp.call("Page.captureScreenshot", format="png")
            (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
            await cdp.click("#stop_no")
            seen["after_cancel"] = await cdp.js("[getComputedStyle(document.getElementById('confirm')).display,"
                                                " document.getElementById('msg').textContent]")
            # the daemon stops answering: a banner; it comes back on the same port: the banner goes
            daemon.terminate()
            seen["banner"] = await cdp.until("document.getElementById('down').className === 'on' && "
                                             "document.getElementById('down').textContent",
                                             what="the banner")
            shot = await cdp.call("Page.captureScreenshot", format="png")
            (tmp_path / "page-down.png").write_bytes(base64.b64decode(shot["data"]))
            restart()
            await cdp.until("document.getElementById('down').className === ''", timeout=30,
                            what="the banner to clear")
            seen["back"] = await cdp.js("document.getElementById('run_id').textContent")
    return seen


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_page_in_a_real_browser(daemons, tmp_path):
    env = _slow_stage_env(tmp_path, HEIDI_API_TOKEN=TOKEN)
    d = daemons(env)
    d.wait_status(lambda v: v.get("stage_log_last_line"), timeout=30, what="the stage to print")
    profile = tempfile.mkdtemp(prefix="heidi-chromium-", dir=str(tmp_path))
    browser, cdp_port = _start_chromium(profile)
    again: list[Daemon] = []

    def restart() -> None:  # on the same port, so that the open page finds it again
        d.kill()
        again.append(daemons(env, "--port", str(d.port)))
    try:
        seen = asyncio.run(_drive(cdp_port, d, tmp_path, restart))
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(10)
        _reap_group(browser.pid)
    assert seen["url"] == f"http://127.0.0.1:{d.port}/"  # the token left the address bar
    first, later = seen["elapsed"]
    assert first != later  # the elapsed time moves
    assert "key [GITHUB_TOKEN] step 3/10" in seen["log"] and "ghp_" not in seen["log"]
    assert seen["holder"] == f"pid {d.proc.pid}"
    assert seen["stage_log"].endswith("logs/round_1/generate.log")
    assert seen["buttons"]["stop"] == [False, ""] and seen["buttons"]["pause"] == [False, ""]
    disabled, why = seen["buttons"]["continue"]
    assert disabled and "only a run in ERROR or stopped can continue" in why
    assert seen["buttons"]["resume"][0] is True and "nothing to resume" in seen["buttons"]["resume"][1]
    assert seen["msg_after_pause"] == "pause: queued"
    assert seen["buttons_after_pause"]["pause"][0] is True  # already requested
    assert seen["buttons_after_pause"]["resume"] == [False, ""]  # resume may follow a queued pause
    assert seen["confirm_shown"] == "block"
    assert seen["after_cancel"] == ["none", "stop cancelled"]
    assert "not answering" in seen["banner"]
    assert seen["back"].startswith("run_")
    assert "pipeline_stop" not in [e["event_type"] for e in d.journal()]  # Cancel sent nothing
    assert (tmp_path / "page.png").stat().st_size > 10_000
