"""Real stages through the CLI: the upstream script contract, failures, timeouts, stop, SIGKILL
of heidi mid-stage, the governor, limits, the train/val split and redaction of stage output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from heidi.config import Config
from heidi.stages import build_argv, split_round

from helpers_loop import REPO

TOKEN = "ghp_" + "Q" * 36

# Minimal stage scripts keeping the upstream contract: each writes the file after --output.
CONTRACT = {
    "01_teacher_generate.py": """
        import argparse, json, os
        p = argparse.ArgumentParser(); p.add_argument("--samples", type=int)
        p.add_argument("--output"); p.add_argument("--round", type=int)
        a = p.parse_args()
        with open(a.output, "w") as f:
            for i in range(a.samples):
                f.write(json.dumps({"id": i, "round": a.round}) + "\\n")
        print("generated", a.samples, "env", os.environ["HEIDI_STAGE"], os.environ["HEIDI_ROUND"])
    """,
    "02_validate_clean.py": """
        import argparse, shutil
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        a = p.parse_args(); shutil.copyfile(a.input, a.output)
    """,
    "03_unit_test_gate.py": """
        import argparse, shutil
        p = argparse.ArgumentParser(); p.add_argument("--input"); p.add_argument("--output")
        a = p.parse_args(); shutil.copyfile(a.input, a.output)
    """,
    "04_train_qlora.py": """
        import argparse, os
        p = argparse.ArgumentParser(); p.add_argument("--data"); p.add_argument("--val-data")
        p.add_argument("--output")
        a = p.parse_args()
        os.makedirs(os.path.join(a.output, "final"), exist_ok=True)
        open(os.path.join(a.output, "final", "adapter.bin"), "w").write("w")
        print("train lines", sum(1 for _ in open(a.data)), "val lines", sum(1 for _ in open(a.val_data)))
    """,
    "05_eval.py": """
        import argparse, json
        p = argparse.ArgumentParser(); p.add_argument("--adapter"); p.add_argument("--data")
        p.add_argument("--output")
        a = p.parse_args(); json.dump({"ok": True}, open(a.output, "w"))
    """,
}


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """A repo root with the contract scripts, and a function running the CLI against it."""
    scripts = tmp_path / "repo" / "scripts"
    scripts.mkdir(parents=True)
    for name, body in CONTRACT.items():
        (scripts / name).write_text(textwrap.dedent(body))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEIDI_", "RUN_", "OUT_DIR"))}
    env.update(PYTHONPATH=REPO, HEIDI_PYTHON=sys.executable, HEIDI_REPO_ROOT=str(tmp_path / "repo"),
               OUT_DIR=str(out), ROUNDS="1", SAMPLES_PER_ROUND="10", HEIDI_FSYNC="0",
               MAX_CPU_PCT="100", MAX_MEM_PCT="100", HEIDI_KILL_GRACE_S="1")

    class Pipeline:
        root = tmp_path
        out_dir = out
        environ = env

        def toml(self, text: str) -> None:
            path = tmp_path / "heidi.toml"
            path.write_text(textwrap.dedent(text))
            env["HEIDI_CONFIG"] = str(path)

        def cli(self, *args, timeout=60, **extra):
            return subprocess.run([sys.executable, "-m", "heidi", *args], env={**env, **extra},
                                  cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)

        def popen(self, *args, **extra):
            return subprocess.Popen([sys.executable, "-m", "heidi", *args], env={**env, **extra},
                                    cwd=str(tmp_path), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)

        def events(self):
            with open(out / "events.jsonl", "rb") as fh:
                return [orjson.loads(line) for line in fh]

        def status(self):
            return orjson.loads(self.cli("status", "--json").stdout)

        def verify(self):
            res = self.cli("verify")
            assert res.returncode == 0, res.stdout + res.stderr
            return res

    return Pipeline()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before or while we read
        return False


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_real_round_with_the_upstream_contract(pipeline):
    res = pipeline.cli("run", "--json", RUN_UNIT_TESTS="1", VAL_RATIO="0.3")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["status"] == "completed"
    out = pipeline.out_dir
    tested = (out / "data" / "tested_round_1.jsonl").read_text().splitlines()
    train = (out / "data" / "train_round_1.jsonl").read_text().splitlines()
    val = (out / "data" / "val_round_1.jsonl").read_text().splitlines()
    assert len(tested) == 10 and len(val) == 3 and len(train) == 7
    assert sorted(train + val) == sorted(tested) and not set(train) & set(val)
    assert (out / "out_lora_round_1" / "final" / "adapter.bin").exists()
    assert (out / "eval" / "report_round_1.json").exists()
    assert "generated 10 env generate 1" in (out / "logs" / "round_1" / "generate.log").read_text()
    assert "train lines 7 val lines 3" in (out / "logs" / "round_1" / "train.log").read_text()
    evs = pipeline.events()
    ok = [e for e in evs if e["event_type"] == "script_success"]
    assert [e["stage"] for e in ok] == ["generate", "validate", "test", "train", "eval"]
    usage = ok[0]["usage_delta"]
    for key in ("memory_mb_delta", "cpu_pct", "system_mem_available_kb_delta", "system_cpu_pct",
                "wall_ms", "peak_rss_kb", "cpu_user_s", "cpu_sys_s"):
        assert key in usage
    assert usage["peak_rss_kb"] > 0 and usage["wall_ms"] > 0
    assert ok[0]["artifact_paths"] == ["data/raw_round_1.jsonl"]
    assert [e["counters_delta"] for e in ok if e["stage"] == "train"] == [
        {"train_samples": 7, "val_samples": 3}]
    pipeline.verify()


def test_failing_stage_with_tokens_is_redacted_everywhere(pipeline):
    pipeline.toml(f"""
        [stages.validate]
        command = ["{{python}}", "-c", "import sys; print('using token {TOKEN}'); print('Authorization: Bearer abcdefghijklmnop1234'); sys.exit(3)"]
    """)
    res = pipeline.cli("run")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "exited with code 3" in res.stderr
    assert "Traceback" not in res.stderr and TOKEN not in res.stderr
    journal = (pipeline.out_dir / "events.jsonl").read_text()
    log = (pipeline.out_dir / "logs" / "round_1" / "validate.log").read_text()
    assert TOKEN not in journal and TOKEN not in log
    assert "abcdefghijklmnop1234" not in journal and "abcdefghijklmnop1234" not in log
    assert "[GITHUB_TOKEN]" in log and "[BEARER_TOKEN]" in log
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"]
    assert len(err) == 1
    assert err[0]["level"] == "error" and err[0]["error"] == "exited with code 3"
    assert "[GITHUB_TOKEN]" in err[0]["message"]
    assert pipeline.cli("tick").returncode == 1
    st = pipeline.status()
    assert (st["state"], st["status"]) == ("ERROR", "error")
    pipeline.verify()


def test_missing_stage_script_is_a_clean_pipeline_error(pipeline):
    os.unlink(pipeline.root / "repo" / "scripts" / "02_validate_clean.py")
    res = pipeline.cli("run")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    assert "validate" in res.stderr
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"][0]
    assert err["stage"] == "validate" and "02_validate_clean.py" in err["message"]


def test_missing_interpreter_is_a_clean_pipeline_error(pipeline):
    res = pipeline.cli("run", HEIDI_PYTHON="/nonexistent/python9")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"][0]
    assert err["stage"] == "generate" and "python9" in err["error"]


def test_timeout_kills_a_stubborn_tree(pipeline, tmp_path):
    pids = tmp_path / "pids.txt"
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        escaped = subprocess.Popen([sys.executable, "-c",
            "import os, signal, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}} {{escaped.pid}}\\n")
        print("stubborn and ready", flush=True)
        time.sleep(600)
    """))
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "{script}"]
        timeout_s = 1.5
    """)
    started = time.monotonic()
    res = pipeline.cli("run", timeout=60)
    took = time.monotonic() - started
    assert res.returncode == 1
    assert "timed out after 1.5 s" in res.stderr
    assert took < 1.5 + 1 + 8  # timeout + grace, plus interpreter start-up slack
    ids = [int(p) for p in pids.read_text().split()]
    assert len(ids) == 3
    _wait_for(lambda: not any(_alive(p) for p in ids), 5, "the stage's processes to be gone")
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"][0]
    assert err["error"] == "timed out after 1.5 s"
    pipeline.verify()


def test_stop_from_another_process_ends_a_running_stage(pipeline, tmp_path):
    marker = tmp_path / "started"
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import time; open({str(marker)!r}, 'w').close(); time.sleep(600)"]
    """)
    proc = pipeline.popen("run")
    try:
        _wait_for(marker.exists, 20, "the stage to start")
        asked = time.monotonic()
        res = pipeline.cli("stop")
        assert res.returncode == 0 and "requested" in res.stdout
        proc.wait(timeout=15)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0
    assert took < 1 + 1 + 3  # about a second to notice, the grace, slack
    evs = pipeline.events()
    assert evs[-1]["event_type"] == "pipeline_stop" and evs[-1]["stage"] == "generate"
    st = pipeline.status()
    assert (st["state"], st["status"]) == ("IDLE", "stopped")
    assert not list((pipeline.out_dir / "control").glob("*.req"))
    pipeline.verify()


def test_sigkill_of_heidi_kills_the_stage_and_the_next_run_reruns_it(pipeline, tmp_path):
    pidfile = tmp_path / "stage.pid"
    once = tmp_path / "second-time"
    script = tmp_path / "slow_generate.py"
    script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys, time
        if os.path.exists({str(once)!r}):
            args = sys.argv[1:]
            open(args[args.index("--output") + 1], "w").write('{{"id": 1}}\\n{{"id": 2}}\\n')
            sys.exit(0)
        open({str(once)!r}, "w").close()
        grandchild = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"])
        with open({str(pidfile)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{grandchild.pid}}\\n")
        time.sleep(600)
    """))
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "{script}", "--output", "{{data_dir}}/raw_round_{{round}}.jsonl"]
    """)
    proc = pipeline.popen("run")
    try:
        _wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 20,
                  "the stage to start")
        stage_pids = [int(p) for p in pidfile.read_text().split()]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_for(lambda: not any(_alive(p) for p in stage_pids), 5, "the stage to die with heidi")
    res = pipeline.cli("run")
    assert res.returncode == 0, res.stderr
    kinds = [e["event_type"] for e in pipeline.events()]
    assert kinds.count("stage_interrupted") == 1
    assert kinds.count("pipeline_complete") == 1
    i = kinds.index("stage_interrupted")
    assert pipeline.events()[i]["stage"] == "generate"
    pipeline.verify()


def test_governor_holds_then_fails_after_max_wall_time(pipeline):
    # MAX_MEM_PCT=1: any real machine uses more than 1% of its memory, so the stage is held.
    res = pipeline.cli("run", MAX_MEM_PCT="1", MAX_WALL_TIME_MINUTES="0.02")
    assert res.returncode == 1
    assert "MAX_WALL_TIME_MINUTES" in res.stderr and "Traceback" not in res.stderr
    evs = pipeline.events()
    throttled = [e for e in evs if e["event_type"] == "pipeline_throttled"]
    assert len(throttled) == 1  # rate-limited: one event, not one per check
    assert throttled[0]["level"] == "warn" and "MAX_MEM_PCT" in throttled[0]["message"]
    err = [e for e in evs if e["event_type"] == "pipeline_error"][0]
    assert err["stage"] == "generate"
    assert not (pipeline.out_dir / "logs" / "round_1" / "generate.log").exists()  # never started


@pytest.mark.parametrize("minutes", ["0.0001", "0.001"])  # 6 ms, 60 ms: under one 0.25 s CPU sample
def test_governor_journals_the_hold_before_failing_however_small_the_limit(pipeline, minutes):
    res = pipeline.cli("run", MAX_MEM_PCT="1", MAX_CPU_PCT="1", MAX_WALL_TIME_MINUTES=minutes)
    assert res.returncode == 1 and "MAX_WALL_TIME_MINUTES" in res.stderr
    kinds = [e["event_type"] for e in pipeline.events()]
    assert kinds.count("pipeline_throttled") == 1
    assert kinds.index("pipeline_throttled") < kinds.index("pipeline_error")
    pipeline.verify()


def test_governor_lets_the_stage_run_when_the_system_is_calm(pipeline):
    res = pipeline.cli("run", MAX_MEM_PCT="99.9", MAX_CPU_PCT="100")
    assert res.returncode == 0, res.stderr
    assert "pipeline_throttled" not in [e["event_type"] for e in pipeline.events()]


def test_limits_are_seen_inside_the_stage(pipeline, tmp_path):
    seen = tmp_path / "limits.json"
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import json, resource; json.dump([resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_CPU)], open({str(seen)!r}, 'w')); raise SystemExit(1)"]
    """)
    res = pipeline.cli("run", HEIDI_MAX_FDS="256", HEIDI_MAX_CPU_S="3600")
    assert res.returncode == 1  # the stage exits 1 on purpose, after recording its limits
    nofile, cpu = orjson.loads(seen.read_bytes())
    assert nofile == [256, 256] and cpu == [3600, 3600]


def test_child_environment(pipeline, tmp_path):
    seen = tmp_path / "env.json"
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import json, os; json.dump(dict(os.environ), open({str(seen)!r}, 'w')); raise SystemExit(1)"]
        env = {{ EXTRA_SETTING = "yes" }}
    """)
    pipeline.cli("run", MY_API_KEY="stage-needs-this-key")
    env = orjson.loads(seen.read_bytes())
    assert env["MY_API_KEY"] == "stage-needs-this-key"  # the user's environment reaches stages
    assert env["HEIDI_STAGE"] == "generate" and env["HEIDI_ROUND"] == "1"
    assert env["HEIDI_OUT_DIR"] == str(pipeline.out_dir) and env["HEIDI_RUN_ID"].startswith("run_")
    assert env["EXTRA_SETTING"] == "yes" and env["SEED"] == "42"


# -- pure functions ---------------------------------------------------------------------------

def _cfg(tmp_path, **kw):
    values = {"OUT_DIR": str(tmp_path), "HEIDI_FSYNC": 0, **kw}
    return Config.load(None, environ={}, overrides=values)


@pytest.mark.parametrize("n,ratio,n_val", [(10, 0.1, 1), (10, 0.25, 2), (2, 0.1, 1), (1, 0.5, 0),
                                           (3, 0.9, 2), (100, 0.0, 1), (1000, 0.2, 200)])
def test_split_sizes_disjoint_and_whole(tmp_path, n, ratio, n_val):
    cfg = _cfg(tmp_path, VAL_RATIO=ratio)
    os.makedirs(cfg.data_dir)
    lines = [f'{{"i": {i}}}' for i in range(n)]
    (tmp_path / "data" / "clean_round_1.jsonl").write_text("\n".join(lines) + "\n")
    train_path, val_path, n_train, got_val = split_round(cfg, 1)
    train = open(train_path).read().splitlines()
    val = open(val_path).read().splitlines()
    assert got_val == len(val) == n_val and n_train == len(train) == n - n_val
    assert sorted(train + val) == sorted(lines) and not set(train) & set(val)
    assert oct(os.stat(train_path).st_mode & 0o777) == "0o600"


def test_split_is_deterministic_for_a_seed(tmp_path):
    lines = [f'{{"i": {i}}}' for i in range(50)]

    def split(seed, round_=1):
        cfg = _cfg(tmp_path, SEED=seed, VAL_RATIO=0.2)
        os.makedirs(cfg.data_dir, exist_ok=True)
        (tmp_path / "data" / f"clean_round_{round_}.jsonl").write_text("\n".join(lines) + "\n")
        _, val_path, _, _ = split_round(cfg, round_)
        return open(val_path).read()

    assert split(7) == split(7)
    assert split(7) != split(8)


def test_split_of_missing_or_empty_input_is_an_error(tmp_path):
    cfg = _cfg(tmp_path)
    os.makedirs(cfg.data_dir)
    with pytest.raises(ValueError, match="missing"):
        split_round(cfg, 1)
    (tmp_path / "data" / "clean_round_1.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        split_round(cfg, 1)


def test_build_argv_fills_placeholders():
    values = {"python": "uv run python", "round": "3", "data_dir": "/d"}
    assert build_argv(["{python}", "x.py", "--in", "{data_dir}/r_{round}.jsonl"], values) == [
        "uv", "run", "python", "x.py", "--in", "/d/r_3.jsonl"]


def test_shell_syntax_in_a_command_is_not_a_placeholder(tmp_path):
    toml = tmp_path / "heidi.toml"
    toml.write_text('[stages.generate]\ncommand = ["/bin/sh", "-c", "echo ${HOME} ${X:-y} {round}"]\n')
    cfg = Config.load(str(toml), environ={}, overrides={"OUT_DIR": str(tmp_path)})
    argv = build_argv(cfg.stages["generate"].command, {"round": "4"})
    assert argv == ["/bin/sh", "-c", "echo ${HOME} ${X:-y} 4"]
    toml.write_text('[stages.generate]\ncommand = ["x", "{rounds}"]\n')  # a typo is caught
    with pytest.raises(Exception, match="placeholder"):
        Config.load(str(toml), environ={}, overrides={"OUT_DIR": str(tmp_path)})


def test_a_secret_given_only_to_the_stage_is_kept_out_of_its_log(pipeline):
    secret = "stage-only-" + "k3y" * 6
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import os; print('key is', os.environ['MY_SERVICE_TOKEN']); raise SystemExit(2)"]
        env = {{ MY_SERVICE_TOKEN = "{secret}" }}
    """)
    res = pipeline.cli("run")
    assert res.returncode == 1
    log = (pipeline.out_dir / "logs" / "round_1" / "generate.log").read_text()
    assert "key is [ENV_SECRET]" in log and secret not in log
    assert secret not in (pipeline.out_dir / "events.jsonl").read_text()


def test_split_streams_with_flat_memory(tmp_path):
    """A 64 MB input is split by a process whose peak RSS grows far less than the input's size."""
    source = tmp_path / "clean_round_1.jsonl"
    block = b"".join(b'{"i": %d, "pad": "%s"}\n' % (i, b"y" * 200) for i in range(1000))
    with open(source, "wb") as fh:
        while fh.tell() < 64 << 20:
            fh.write(block)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def peak_mb(code: str) -> float:
        # VmHWM of the child itself: rusage would also count the parent's pages until exec
        code += "\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-2]) / 1024

    floor = peak_mb("import heidi.split")
    split = peak_mb("from heidi.split import split_file; "
                    f"split_file({str(source)!r}, {str(tmp_path / 't')!r}, {str(tmp_path / 'v')!r},"
                    " 0.1, 1, fsync=False)")
    assert split - floor < 24, f"split grew RSS by {split - floor:.0f} MB for a 64 MB input"
    assert os.path.getsize(tmp_path / "t") + os.path.getsize(tmp_path / "v") == os.path.getsize(source)


def test_split_removes_its_temporary_files_on_failure(tmp_path):
    cfg = _cfg(tmp_path)
    os.makedirs(cfg.data_dir)
    (tmp_path / "data" / "clean_round_1.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    os.mkdir(tmp_path / "data" / "val_round_1.jsonl")  # the val file cannot replace a directory
    with pytest.raises(OSError):
        split_round(cfg, 1)
    assert not [name for name in os.listdir(cfg.data_dir) if name.endswith(".tmp")]
