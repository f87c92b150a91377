"""`heidi generate` through the CLI against a real local server: crash-safe resume after SIGKILL,
torn lines, budgets and errors as exit codes, TEACHER_* validation, keys in no file of a run, and
stage counters reaching state.json and /metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from heidi.config import SETTINGS
from heidi.stages import build_argv, heidi_argv

REPO = str(Path(__file__).resolve().parent.parent)
KEY = "sk-proj-" + "Zq7" * 12


def env_for(url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS and k not in ("HEIDI_CONFIG", "TEACHER_API_KEY", "OPENAI_API_KEY",
                                              "ANTHROPIC_API_KEY", "HEIDI_COUNTERS_FILE", "HEIDI_ROUND")}
    env["PYTHONPATH"] = REPO
    if url is not None:
        env.update(TEACHER_PROVIDER="openai", TEACHER_BASE_URL=url + "/v1", TEACHER_API_KEY=KEY)
    env.update(extra)
    return env


def generate(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", "generate", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def lines_of(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_output_shape_ids_and_counters_file(tmp_path, server):
    _, srv = server()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Sort a list", "input": "[3, 1]"}\n\nplain prompt\n')
    counters = tmp_path / "c.json"
    run = generate("--samples", "5", "--output", "data/raw.jsonl", "--prompts", str(prompts),
                   "--round", "3", "--seed", "9", env=env_for(srv.url, HEIDI_COUNTERS_FILE=str(counters)),
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    samples = lines_of(tmp_path / "data" / "raw.jsonl")
    assert sorted(s["id"] for s in samples) == [f"r3-s9-{i:06d}" for i in range(5)]
    by_id = {s["id"]: s for s in samples}
    first, second = by_id["r3-s9-000000"], by_id["r3-s9-000001"]
    assert (first["instruction"], first["input"]) == ("Sort a list", "[3, 1]")
    assert (second["instruction"], second["input"]) == ("plain prompt", "")
    assert by_id["r3-s9-000002"]["instruction"] == "Sort a list"  # cycled to N
    assert first["output"] == "answer to Sort a list\n\n[3, 1]"
    meta = first["metadata"]
    assert set(meta) == {"provider", "model", "round", "prompt_tokens", "completion_tokens", "latency_ms"}
    assert (meta["provider"], meta["model"], meta["round"]) == ("openai", "gpt-4o-mini", 3)
    assert meta["completion_tokens"] == 4 and meta["latency_ms"] > 0
    assert orjson.loads(counters.read_bytes()) == {
        "samples": 5, "requests": 5, "retries": 0, "failures": 0,
        "prompt_tokens": sum(s["metadata"]["prompt_tokens"] for s in samples), "completion_tokens": 20}
    assert (tmp_path / "data" / "raw.jsonl").stat().st_mode & 0o777 == 0o600


def test_resume_after_sigkill_repeats_no_answered_request(tmp_path, server):
    fake, srv = server(latency_s=0.05)
    n = 80
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"task number {i}\n" for i in range(n)))
    out = tmp_path / "raw.jsonl"
    argv = [sys.executable, "-m", "heidi", "generate", "--samples", str(n), "--output", str(out),
            "--prompts", str(prompts)]
    env = env_for(srv.url, TEACHER_CONCURRENCY="4")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 20:
                break
            assert proc.poll() is None, "generate finished before it could be killed"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    before = [orjson.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]
    assert 20 <= len(before) < n
    sent_before = sum(fake.counts.values())

    rerun = generate("--samples", str(n), "--output", str(out), "--prompts", str(prompts), env=env,
                     cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    samples = lines_of(out)
    assert len(samples) == n and len({s["id"] for s in samples}) == n
    assert {s["id"] for s in samples} == {f"r1-s42-{i:06d}" for i in range(n)}
    # No request whose answer was written is sent again; only those in flight at the kill
    # (at most TEACHER_CONCURRENCY) were asked twice.
    for sample in before:
        assert fake.counts[sample["instruction"]] == 1, sample["id"]
    repeated = [p for p, count in fake.counts.items() if count > 1]
    assert len(repeated) <= 4 and all(fake.counts[p] == 2 for p in repeated)
    assert sum(fake.counts.values()) == n + len(repeated)
    assert sent_before - len(before) >= len(repeated)
    # Run again: nothing left to do, nothing sent.
    total = sum(fake.counts.values())
    again = generate("--samples", str(n), "--output", str(out), "--prompts", str(prompts), env=env,
                     cwd=tmp_path)
    assert again.returncode == 0 and sum(fake.counts.values()) == total and len(lines_of(out)) == n


def test_a_torn_last_line_is_cut_and_resumed(tmp_path):
    out = tmp_path / "raw.jsonl"
    env = env_for(TEACHER_MOCK_DELAY_MS="0")
    assert generate("--samples", "4", "--output", str(out), env=env, cwd=tmp_path).returncode == 0
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "r1-s42-000004", "instruction": "Compl')
    run = generate("--samples", "6", "--output", str(out), env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    samples = lines_of(out)
    assert out.read_bytes().startswith(whole)
    assert [s["id"] for s in samples][:4] == [f"r1-s42-{i:06d}" for i in range(4)]
    assert sorted(s["id"] for s in samples) == [f"r1-s42-{i:06d}" for i in range(6)]


def test_budget_and_fatal_errors_exit_1_with_one_line_and_keep_the_data(tmp_path, server):
    fake, srv = server()
    out = tmp_path / "raw.jsonl"
    run = generate("--samples", "10", "--output", str(out), env=env_for(srv.url, TEACHER_MAX_REQUESTS="4",
                   TEACHER_CONCURRENCY="2"), cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "request budget of 4 reached (TEACHER_MAX_REQUESTS)" in run.stderr
    assert len(lines_of(out)) == 4 and sum(fake.counts.values()) == 4

    bad = server(key="another-key-000000000000")[1]
    run = generate("--samples", "10", "--output", str(out), env=env_for(bad.url), cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "HTTP 401" in run.stderr and KEY not in run.stderr + run.stdout
    assert len(lines_of(out)) == 4


@pytest.mark.parametrize("setting, value, expect", [
    ("TEACHER_PROVIDER", "gpt", "must be one of mock, openai, anthropic"),
    ("TEACHER_CONCURRENCY", "0", "from 1 to 10000"),
    ("TEACHER_TIMEOUT_S", "-1", "TEACHER_TIMEOUT_S='-1'"),
    ("TEACHER_MAX_REQUESTS", "many", "TEACHER_MAX_REQUESTS='many'"),
    ("TEACHER_TEMPERATURE", "9", "from 0 to 2"),
    ("TEACHER_BASE_URL", "http://192.0.2.1/v1", "TEACHER_ALLOW_HTTP=1"),
    ("TEACHER_BASE_URL", f"https://u:{KEY}@api.example.com/v1", "without credentials"),
])
def test_bad_teacher_settings_exit_2_in_one_line(tmp_path, setting, value, expect):
    run = generate("--samples", "1", "--output", "x.jsonl", env=env_for(**{setting: value}), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and expect in run.stderr, run.stderr
    assert KEY not in run.stderr and not (tmp_path / "x.jsonl").exists()


def test_missing_key_for_a_remote_provider_is_a_config_error(tmp_path):
    run = generate("--samples", "1", "--output", "x.jsonl", env=env_for(TEACHER_PROVIDER="anthropic"),
                   cwd=tmp_path)
    assert run.returncode == 2 and "ANTHROPIC_API_KEY" in run.stderr and run.stderr.count("\n") == 1
    (tmp_path / "heidi.toml").write_text(f'teacher_api_key = "{KEY}"\n')
    run = generate("--samples", "1", "--output", "x.jsonl", env=env_for(), cwd=tmp_path)
    assert run.returncode == 2 and "environment only" in run.stderr and KEY not in run.stderr


def test_heidi_placeholder_runs_this_heidi():
    assert heidi_argv() == [sys.executable, "-m", "heidi"]
    import shlex
    argv = build_argv(["{heidi}", "generate", "--round={round}"],
                      {"heidi": shlex.join(["/opt/my py/python", "-m", "heidi"]), "round": "2"})
    assert argv == ["/opt/my py/python", "-m", "heidi", "generate", "--round=2"]


# ---- through heidi run / the daemon ------------------------------------------------------------

def init_demo(tmp_path: Path, env: dict[str, str], rounds: int = 1) -> Path:
    demo = tmp_path / "demo"
    init = subprocess.run([sys.executable, "-m", "heidi", "init", str(demo)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    toml = demo / "heidi.toml"
    toml.write_text(toml.read_text().replace("rounds = 2", f"rounds = {rounds}"))
    return demo


def run_env(**extra: str) -> dict[str, str]:
    return env_for(HEIDI_PYTHON=sys.executable, MAX_CPU_PCT="100", MAX_MEM_PCT="100",
                   HEIDI_FSYNC="0", TEACHER_MOCK_DELAY_MS="5", **extra)


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_the_key_reaches_no_file_of_a_run_even_when_the_provider_echoes_it(tmp_path, server):
    fake, srv = server(key="the-server-wants-this-other-key")
    env = run_env(TEACHER_PROVIDER="openai", TEACHER_BASE_URL=srv.url + "/v1", TEACHER_API_KEY=KEY)
    demo = init_demo(tmp_path, env)
    run = subprocess.run([sys.executable, "-m", "heidi", "run"], env=env, cwd=demo,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "failed in generate" in run.stderr
    assert fake.auth_seen and set(fake.auth_seen) == {KEY}  # sent, refused, echoed back
    status = subprocess.run([sys.executable, "-m", "heidi", "status", "--json"], env=env, cwd=demo,
                            capture_output=True, text=True, timeout=60)
    events = (demo / "out" / "events.jsonl").read_text()
    assert "HTTP 401" in events and "Incorrect API key" in events
    files = all_files(demo)
    assert any(p.name == "generate.log" for p in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in run.stdout + run.stderr + status.stdout + status.stderr


def test_init_and_run_offline_counters_reach_state_and_metrics(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_daemon import Daemon, request, wait_for
    env = run_env(HEIDI_MODE="full", ROUNDS="1")
    demo = init_demo(tmp_path, env)
    daemon = Daemon(demo, env)
    try:
        daemon.wait_listening()
        wait_for(lambda: daemon.status().get("status") == "completed", 120, "the run to complete")
        code, _, body = request(daemon.port, "GET", "/metrics")
    finally:
        daemon.terminate()
        daemon.kill()
    assert code == 200
    metrics = body.decode()
    state = orjson.loads((demo / "out" / "state.json").read_bytes())
    counters = state["counters"]
    assert counters["samples"] == 20 and counters["requests"] == 20 and counters["failures"] == 0
    assert counters["prompt_tokens"] > 0 and counters["completion_tokens"] > 0
    assert 'heidi_counter{name="samples"} 20' in metrics
    assert f'heidi_counter{{name="prompt_tokens"}} {counters["prompt_tokens"]}' in metrics
    events = [orjson.loads(line) for line in (demo / "out" / "events.jsonl").read_bytes().splitlines()]
    [success] = [e for e in events if e["event_type"] == "script_success" and e["stage"] == "generate"]
    assert success["counters_delta"]["samples"] == 20


def test_bad_counters_file_is_a_warning_not_a_crash(tmp_path):
    env = run_env(HEIDI_MODE="full", ROUNDS="1")
    demo = init_demo(tmp_path, env)
    toml = demo / "heidi.toml"
    # The real generate first (it writes good counters), then garbage over them.
    writer = ("import json, os, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
              "open(os.environ['HEIDI_COUNTERS_FILE'], 'w').write(json.dumps({'ok': 1, 'bad': 'text'})); "
              "sys.exit(rc)")
    text = toml.read_text().replace('command = ["{heidi}", "generate",',
                                    f'command = ["{{python}}", "-c", "{writer}", "{{python}}", '
                                    '"-m", "heidi", "generate",')
    toml.write_text(text)
    run = subprocess.run([sys.executable, "-m", "heidi", "run"], env=env, cwd=demo,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    events = [orjson.loads(line) for line in (demo / "out" / "events.jsonl").read_bytes().splitlines()]
    [warn] = [e for e in events if e["event_type"] == "counters_invalid"]
    assert warn["level"] == "warn" and "'bad' must be a number" in warn["message"]
    state = orjson.loads((demo / "out" / "state.json").read_bytes())
    assert "ok" not in state["counters"] and "samples" not in state["counters"]


def test_tick_and_status_do_not_import_aiohttp(tmp_path):
    code = ("import sys; from heidi.cli import main; main(['status', '--out-dir', sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' "
            "or m in ('heidi.providers', 'heidi.collector', 'asyncio')))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], env=env_for(
        TEACHER_BASE_URL="https://api.example.com/v1"), cwd=tmp_path, capture_output=True, text=True,
        timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "['heidi.providers']"  # checks the URL, no aiohttp
