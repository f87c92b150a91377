"""A run is never thrown away, end to end with real processes and the example pipeline of
`heidi init`: a shared OUT_DIR keeps the user's files through three runs; a signal to the daemon,
`heidi run` or `heidi tick` in the middle of a slow train stage leaves the run resumable in its
run_id; a stage that fails once goes on with `continue` (CLI or API); `heidi run` is idempotent
for a RUN_ID that completed."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import subprocess
import sys
import time

import orjson
import pytest

from helpers_loop import REPO

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")

# Settings a developer's shell might export; these tests pin their own.
_SCRUB = ("RUN_ID", "OUT_DIR", "HEIDI_MODE", "ROUNDS", "RUN_UNIT_TESTS", "HEIDI_CONFIG",
          "HEIDI_MOCK_SUBPROCESSES", "HEIDI_FSYNC", "HEIDI_CLOCK", "HEIDI_REPO_ROOT", "HEIDI_HOST",
          "HEIDI_PORT", "HEIDI_API_TOKEN", "HEIDI_PYTHON", "HEIDI_KILL_GRACE_S", "MAX_CPU_PCT",
          "MAX_MEM_PCT", "HEIDI_STAGE_TIMEOUT_S")


class Pipeline:
    """The example pipeline in tmp_path/demo; train waits while tmp_path/slow exists."""

    def __init__(self, tmp_path, shared: bool = False, rounds: int = 1) -> None:
        self.tmp = tmp_path
        self.dir = tmp_path / "demo"
        self.slow = tmp_path / "slow"
        self.env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        # the machine is shared and loaded: the governor must not hold the stages
        self.env.update(PYTHONPATH=REPO, MAX_CPU_PCT="100", MAX_MEM_PCT="100", ROUNDS=str(rounds),
                        HEIDI_FSYNC="0", HEIDI_KILL_GRACE_S="2", HEIDI_PYTHON=sys.executable)
        done = self.cli("init", str(self.dir), cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr
        toml = self.dir / "heidi.toml"
        text = toml.read_text()
        if shared:
            text, n = re.subn(r'(?m)^out_dir = .*$', 'out_dir = "."', text)
            assert n == 1
        # train, as the example has it, behind a wait the test controls
        text += (
            '\n[stages.train]\ncommand = ["/bin/sh", "-c", '
            f'"while [ -e {self.slow} ]; do sleep 0.05; done; exec \\"$@\\"", "train", '
            '"{python}", "{scripts_dir}/04_train_qlora.py", '
            '"--data", "{data_dir}/train_round_{round}.jsonl", '
            '"--val-data", "{data_dir}/val_round_{round}.jsonl", '
            '"--output", "{out_dir}/out_lora_round_{round}"]\n')
        toml.write_text(text)
        self.out = self.dir if shared else self.dir / "out"

    def cli(self, *args: str, cwd: str | None = None, timeout: float = 120, **extra: str):
        return subprocess.run([sys.executable, "-m", "heidi", *args], env={**self.env, **extra},
                              cwd=cwd or str(self.dir), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "heidi", *args], env={**self.env, **extra},
                                cwd=str(self.dir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def state(self) -> dict:
        try:
            return orjson.loads((self.out / "state.json").read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}

    def wait_train_running(self, proc: subprocess.Popen, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state.get("current_stage") == "train" and state.get("stage_status") == "running":
                time.sleep(0.3)  # the stage itself is up (sh waiting on the slow file)
                return state
            if proc.poll() is not None:
                raise AssertionError(f"heidi exited {proc.returncode}: {proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError("train never started")

    def events(self) -> list[dict]:
        with open(self.out / "events.jsonl", "rb") as fh:
            return [orjson.loads(line) for line in fh]

    def kinds(self) -> list[str]:
        return [e["event_type"] for e in self.events()]

    def status(self) -> dict:
        done = self.cli("status", "--json")
        return orjson.loads(done.stdout)

    def verify(self, path=None) -> None:
        done = self.cli("verify", str(path or self.out))
        assert done.returncode == 0 and done.stdout.startswith("OK:"), done.stdout + done.stderr


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _checksums(root) -> dict[str, str]:
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return found


# -- a shared OUT_DIR -------------------------------------------------------------------------

def test_a_shared_out_dir_keeps_the_users_files_through_three_runs(tmp_path):
    p = Pipeline(tmp_path, shared=True, rounds=2)
    (p.dir / "NOTES.md").write_text("# what I tried\n")
    os.makedirs(p.dir / ".ssh", mode=0o700)
    (p.dir / ".ssh" / "id_ed25519").write_text("-----not a real key-----\n")
    user = _checksums(p.dir)
    assert set(user) >= {"heidi.toml", "NOTES.md", ".ssh/id_ed25519", "scripts/04_train_qlora.py"}
    ids = []
    for _ in range(3):
        done = p.cli("run")
        assert done.returncode == 0, done.stderr
        ids.append(p.status()["run_id"])
        assert p.status()["status"] == "completed"
        now = _checksums(p.dir)
        assert {k: now.get(k) for k in user} == user  # every user file, byte for byte
    assert len(set(ids)) == 3
    assert sorted(os.listdir(p.dir / "runs")) == sorted(ids[:2])
    heidi_own = {"events.jsonl", "state.json", "heidi.lock", "runs", "logs", "data", "eval",
                 "out_lora_round_1", "out_lora_round_2"}
    assert set(os.listdir(p.dir)) == {"heidi.toml", "NOTES.md", ".ssh", "scripts"} | heidi_own
    for run_id in ids[:2]:
        archive = p.dir / "runs" / run_id
        assert set(os.listdir(archive)) == heidi_own - {"heidi.lock", "runs"}
        p.verify(archive)
        assert (archive / "logs" / "round_2" / "eval.log").is_file()
    p.verify()


# -- signals end the process, not the run --------------------------------------------------------

@pytest.mark.parametrize("command,sig", [
    ("run", signal.SIGTERM), ("run", signal.SIGINT), ("run", signal.SIGHUP),
    ("tick", signal.SIGTERM), ("tick", signal.SIGINT), ("tick", signal.SIGHUP)])
def test_a_signal_to_run_or_tick_mid_stage_leaves_the_run_resumable(tmp_path, command, sig):
    p = Pipeline(tmp_path)
    if command == "tick":
        assert p.cli("start").returncode == 0
    p.slow.touch()
    proc = p.popen(*(["run"] if command == "run" else ["tick", "--steps", "100"]))
    try:
        state = p.wait_train_running(proc)
        started = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(15)
        assert time.monotonic() - started < 2 + 2  # grace, with slack
    finally:
        _kill(proc)
    stderr = proc.stderr.read()
    assert code == 128 + sig, stderr
    name = signal.Signals(sig).name
    assert stderr.count("\n") == 1 and name in stderr and "interrupted" in stderr
    kinds = p.kinds()
    assert kinds[-2:] == ["stage_start", "pipeline_interrupted"] and "pipeline_stop" not in kinds
    assert p.events()[-1]["stage"] == "train" and name in p.events()[-1]["message"]
    view = p.status()
    assert view["status"] == "interrupted" and view["interrupted"] is True
    assert "interrupted" in p.cli("status").stdout
    # the next process takes up the same run: train runs again, the run completes
    p.slow.unlink()
    done = p.cli(command, *(["--steps", "100"] if command == "tick" else []))
    assert done.returncode == 0, done.stderr
    kinds = p.kinds()
    assert p.status()["status"] == "completed" and p.status()["run_id"] == state["run_id"]
    assert kinds.count("pipeline_start") == 1 and kinds.count("stage_interrupted") == 1
    p.verify()


def test_sigterm_to_the_daemon_in_a_slow_train_then_a_new_daemon_completes_the_run(tmp_path):
    p = Pipeline(tmp_path, rounds=2)
    p.slow.touch()
    daemon = p.popen("daemon", "--port", "0")
    try:
        state = p.wait_train_running(daemon)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        _kill(daemon)
    assert "SIGTERM" in daemon.stderr.read()
    view = p.status()
    assert view["status"] == "interrupted" and view["stage"] == "train"
    assert "pipeline_stop" not in p.kinds()
    p.slow.unlink()
    again = p.popen("daemon", "--port", "0")
    try:
        deadline = time.monotonic() + 90
        while p.state().get("status") != "completed":
            assert time.monotonic() < deadline, "the run never completed"
            assert again.poll() is None, again.stderr.read()
            time.sleep(0.1)
        again.send_signal(signal.SIGTERM)
        assert again.wait(15) == 0
    finally:
        _kill(again)
    kinds = p.kinds()
    assert p.state()["run_id"] == state["run_id"]
    assert kinds.count("pipeline_start") == 1 and kinds.count("stage_interrupted") == 1
    assert kinds[-1] == "pipeline_complete" and not (p.out / "runs").exists()
    p.verify()


# -- continue ---------------------------------------------------------------------------------

def _flaky_validate(p: Pipeline) -> None:
    """validate fails while tmp_path/flaky exists (an API outage), else runs as the example's."""
    text = (p.dir / "heidi.toml").read_text()
    text += ('\n[stages.validate]\ncommand = ["/bin/sh", "-c", '
             f'"if [ -e {p.tmp}/flaky ]; then echo outage >&2; exit 3; fi; exec \\"$@\\"", "validate", '
             '"{python}", "{scripts_dir}/02_validate_clean.py", '
             '"--input", "{data_dir}/raw_round_{round}.jsonl", '
             '"--output", "{data_dir}/clean_round_{round}.jsonl"]\n')
    (p.dir / "heidi.toml").write_text(text)
    (p.tmp / "flaky").touch()


def test_a_stage_that_fails_once_goes_on_with_heidi_continue(tmp_path):
    p = Pipeline(tmp_path)
    _flaky_validate(p)
    failed = p.cli("run")
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert "failed in validate" in failed.stderr and "`heidi continue`" in failed.stderr
    run_id = p.status()["run_id"]
    (p.tmp / "flaky").unlink()
    cont = p.cli("continue")
    assert cont.returncode == 0, cont.stderr
    done = p.cli("run")
    assert done.returncode == 0, done.stderr
    assert (p.status()["run_id"], p.status()["status"]) == (run_id, "completed")
    kinds = p.kinds()
    i = kinds.index("pipeline_error")
    assert kinds[i:i + 3] == ["pipeline_error", "pipeline_continue", "stage_start"]
    assert kinds.count("pipeline_start") == 1
    p.verify()


def test_continue_through_the_api_and_the_page(tmp_path):
    p = Pipeline(tmp_path)
    _flaky_validate(p)
    assert p.cli("run").returncode == 1
    run_id = p.status()["run_id"]
    daemon = p.popen("daemon", "--port", "0")
    try:
        deadline = time.monotonic() + 30
        while not (p.out / "daemon.json").exists():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.05)
        port = orjson.loads((p.out / "daemon.json").read_bytes())["port"]

        def call(method: str, path: str):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        code, page = call("GET", "/")
        assert code == 200 and b'data-a="continue"' in page
        code, body = call("GET", "/api/v1/status")
        assert orjson.loads(body)["status"] == "error"  # the daemon leaves a failed run as it is
        (p.tmp / "flaky").unlink()
        code, body = call("POST", "/api/v1/action/continue")
        assert code == 202, body
        while p.state().get("status") != "completed":
            assert time.monotonic() < deadline + 60, "the run never completed"
            time.sleep(0.1)
        code, body = call("POST", "/api/v1/action/continue")
        assert code == 409 and b"only a run in ERROR or stopped" in body
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
    finally:
        _kill(daemon)
    assert p.state()["run_id"] == run_id and p.kinds().count("pipeline_continue") == 1
    p.verify()


# -- heidi run is idempotent ------------------------------------------------------------------

def test_heidi_run_twice_with_one_run_id(tmp_path):
    p = Pipeline(tmp_path)
    first = p.cli("run", RUN_ID="exp-1")
    assert first.returncode == 0, first.stderr
    journal = (p.out / "events.jsonl").read_bytes()
    second = p.cli("run", RUN_ID="exp-1")
    assert second.returncode == 0, second.stderr
    assert "run exp-1 already completed" in second.stdout
    assert (p.out / "events.jsonl").read_bytes() == journal
    # archived by the next run, it is still "already completed"
    assert p.cli("run", RUN_ID="exp-2").returncode == 0
    third = p.cli("run", "--json", RUN_ID="exp-1")
    assert third.returncode == 0, third.stderr
    view = orjson.loads(third.stdout)
    assert view["already_completed"] is True and view["run_id"] == "exp-1"
    assert view["archived"].endswith(os.path.join("runs", "exp-1"))
    assert p.status()["run_id"] == "exp-2"
    p.verify()


@pytest.mark.parametrize("where", ["out_dir", "archived"])
def test_heidi_run_with_a_completed_run_id_whose_state_json_is_lost(tmp_path, where):
    """state.json is a cache: lost or damaged, the journal still says the run completed, and a
    second `heidi run` with its RUN_ID starts nothing (not a second run under the same id)."""
    p = Pipeline(tmp_path)
    assert p.cli("run", RUN_ID="exp-1").returncode == 0
    run_dir = p.out
    if where == "archived":
        assert p.cli("run", RUN_ID="exp-2").returncode == 0
        run_dir = p.out / "runs" / "exp-1"
        (run_dir / "state.json").unlink()
    else:
        (run_dir / "state.json").write_bytes(b'{"run_id": "exp-1"}')
    journal = (p.out / "events.jsonl").read_bytes()
    again = p.cli("run", "--json", RUN_ID="exp-1")
    assert again.returncode == 0, again.stderr
    view = orjson.loads(again.stdout)
    assert view["already_completed"] is True and view["run_id"] == "exp-1"
    assert (p.out / "events.jsonl").read_bytes() == journal
    runs = p.out / "runs"
    assert (sorted(os.listdir(runs)) if runs.exists() else []) == (
        ["exp-1"] if where == "archived" else [])
