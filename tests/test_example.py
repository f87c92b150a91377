"""The example pipeline `heidi init` writes: the files, each script's contract on its own, and a
two-round run through the real CLI with real subprocesses."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from heidi.config import SETTINGS, Config
from heidi.errors import UsageError
from heidi.example import SCRIPT_NAMES, write_example

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "heidi" / "example" / "scripts"
# Built by concatenation, as the generator does: no credential-shaped literal in this file.
FAKE_TOKEN = "ghp_" + "x" * 36


def script(name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, samples: list) -> Path:
    path.write_text("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in samples))
    return path


def sample(i: int, code: str | None = None, tests: str | None = None) -> dict:
    """A sample as `heidi generate` writes it: the tests in the input, the code in the output."""
    code = code if code is not None else f"def f{i}(x):\n    return x + {i}\n"
    tests = tests if tests is not None else f"assert f{i}(1) == {1 + i}\n"
    return {"id": f"t-{i}", "instruction": f"Write f{i}(x) returning x + {i}.",
            "input": f"Tests:\n```python\n{tests}```", "output": f"```python\n{code}```",
            "metadata": {"provider": "mock", "model": "mock", "round": 1}}


def heidi_generate(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full_env.update(PYTHONPATH=str(REPO_ROOT), TEACHER_MOCK_DELAY_MS="0", **(env or {}))
    return subprocess.run([sys.executable, "-m", "heidi", "generate", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=60)


def content(path: Path) -> list[tuple]:
    """The samples of a file without their latency (the only thing that varies run to run)."""
    return [(s["id"], s["instruction"], s["input"], s["output"]) for s in map(json.loads, read_lines(path))]


# ---- write_example ---------------------------------------------------------------------------

def test_write_example_writes_config_and_executable_scripts(tmp_path):
    target = tmp_path / "demo"
    written = write_example(str(target))
    expected = [target / "heidi.toml"] + [target / "scripts" / n for n in SCRIPT_NAMES]
    assert [Path(p) for p in written] == expected
    assert stat.S_IMODE((target / "heidi.toml").stat().st_mode) == 0o644
    for name in SCRIPT_NAMES:
        path = target / "scripts" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        assert path.read_bytes() == (SCRIPTS / name).read_bytes()
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
    assert sorted(p.name for p in target.rglob("*")) == sorted(["heidi.toml", "scripts", *SCRIPT_NAMES])


def test_write_example_refuses_to_overwrite_and_writes_nothing(tmp_path):
    target = tmp_path / "demo"
    (target / "scripts").mkdir(parents=True)
    existing = target / "scripts" / "04_train_qlora.py"
    existing.write_text("my own trainer\n")
    with pytest.raises(UsageError) as exc:
        write_example(str(target))
    message = str(exc.value)
    assert "\n" not in message and str(existing) in message and "--force" in message
    assert existing.read_text() == "my own trainer\n"
    assert sorted(p.name for p in target.rglob("*")) == ["04_train_qlora.py", "scripts"]

    write_example(str(target), force=True)
    assert existing.read_bytes() == (SCRIPTS / "04_train_qlora.py").read_bytes()
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    assert (target / "heidi.toml").is_file()


def test_init_cli_refusal_is_one_line_exit_2(tmp_path):
    target = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.run([sys.executable, "-m", "heidi", "init", str(target)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (target / "scripts" / "05_eval.py").is_file()
    again = subprocess.run([sys.executable, "-m", "heidi", "init", str(target)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "--force" in again.stderr and "heidi.toml" in again.stderr


def test_example_config_loads_and_its_commented_settings_are_valid(tmp_path, monkeypatch):
    example = REPO_ROOT / "heidi" / "example"
    text = (example / "heidi.toml").read_text()
    monkeypatch.chdir(tmp_path)  # out_dir = "out" is relative to the toml, not to the cwd
    cfg = Config.load(str(example / "heidi.toml"), environ={})
    assert (cfg.rounds, cfg.samples_per_round, cfg.run_unit_tests, cfg.val_ratio) == (2, 20, True, 0.2)
    assert cfg.out_dir == str(example / "out")
    assert cfg.scripts_dir == str(example / "scripts")
    # Uncomment every `# key = value` line and the [stages.train] block: all must be accepted.
    lines = []
    for line in text.splitlines():
        body = line[2:] if line.startswith("# ") else None
        if body and (body == "[stages.train]" or body.startswith(" ")
                     or (" = " in body and body.split(" = ")[0].isidentifier())):
            lines.append(body)
        else:
            lines.append(line)
    uncommented = tmp_path / "heidi.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    full = Config.load(str(uncommented), environ={})
    assert full.max_memory_mb == 65536 and full.max_cpu_pct == 95
    assert full.stages["train"].timeout_s == 172800
    assert full.stages["train"].env["CUDA_VISIBLE_DEVICES"] == "0"


# ---- the scripts one by one ------------------------------------------------------------------

def test_mock_generate_is_deterministic_from_round_and_seed(tmp_path):
    def make(name: str, round_: str, seed: str) -> Path:
        out = tmp_path / name
        run = heidi_generate("--samples", "30", "--output", str(out), "--round", round_, "--seed", seed,
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        return out
    first = make("a.jsonl", "1", "7")
    assert content(make("b.jsonl", "1", "7")) == content(first)
    assert content(make("c.jsonl", "2", "7")) != content(first)
    assert content(make("d.jsonl", "1", "8")) != content(first)
    samples = [json.loads(line) for line in read_lines(first)]
    assert sorted(s["id"] for s in samples) == [f"r1-s7-{i:06d}" for i in range(30)]
    kinds = {s["instruction"].split()[0] for s in samples}
    assert kinds == {"Complete", "The", "Refactor"}  # completion, bug fixing, refactoring
    assert all("assert " in s["input"] and s["output"].startswith("```python") for s in samples)


def test_pipeline_scripts_one_by_one(tmp_path):
    raw, clean, tested = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl", tmp_path / "tested.jsonl"
    good = [sample(i) for i in range(8)]
    leaked = sample(8, code=f"TOKEN = {FAKE_TOKEN!r}\ndef f8(x):\n    return x + 8\n")
    duplicate = {**good[2], "id": "t-dup"}
    failing = sample(9, code="def f9(x):\n    return x + 1\n")
    untested = {**sample(10), "input": ""}
    write_jsonl(raw, good[:3] + [leaked, duplicate, "{not json", failing, untested] + good[3:])

    run = script("02_validate_clean.py", "--input", str(raw), "--output", str(clean))
    assert run.returncode == 0, run.stderr
    kept = [json.loads(line)["id"] for line in read_lines(clean)]
    assert kept == ["t-0", "t-1", "t-2", "t-9", "t-10"] + [f"t-{i}" for i in range(3, 8)]
    assert "read 13, kept 10" in run.stdout
    assert "malformed=1" in run.stdout and "duplicate=1" in run.stdout and "secret=1" in run.stdout
    assert FAKE_TOKEN not in run.stdout + run.stderr

    run = script("03_unit_test_gate.py", "--input", str(clean), "--output", str(tested))
    assert run.returncode == 0, run.stderr
    kept = read_lines(tested)
    assert [json.loads(line)["id"] for line in kept] == [f"t-{i}" for i in range(8)]
    assert "passed 8, failed 1, timeout 0, untested 1" in run.stdout and "t-9 failed" in run.stdout

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(line + "\n" for line in kept[:6]))
    val.write_text("".join(line + "\n" for line in kept[6:]))
    lora = tmp_path / "out_lora_round_3"
    run = script("04_train_qlora.py", "--data", str(train), "--val-data", str(val), "--output", str(lora),
                 env={"TRAIN_STEPS": "5", "BASE_MODEL": "org/base-1b"})
    assert run.returncode == 0, run.stderr
    losses = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in run.stdout.splitlines() if line.startswith("step ")] == \
        [f"{i}/5" for i in range(1, 6)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    adapter = json.loads((lora / "final" / "adapter.json").read_text())
    assert adapter["base_model"] == "org/base-1b" and adapter["vocab"]
    metrics = json.loads((lora / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["n_train"] == 6 and metrics["n_val"] == 2
    assert metrics["base_model"] == "org/base-1b"
    assert metrics["train_loss"] == pytest.approx(losses[-1], abs=1e-4)

    report = tmp_path / "eval" / "report_round_3.json"
    run = script("05_eval.py", "--adapter", str(lora / "final"), "--data", str(val), "--output", str(report),
                 env={"HEIDI_ROUND": "3"})
    assert run.returncode == 0, run.stderr
    result = json.loads(report.read_text())
    assert result["round"] == 3 and result["n_val"] == 2
    assert 0.0 < result["score"] <= 1.0
    assert result["adapter"] == str(lora / "final")


def test_mock_teacher_output_goes_through_validate_and_the_gate(tmp_path):
    raw, clean, tested = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl", tmp_path / "tested.jsonl"
    assert heidi_generate("--samples", "60", "--output", str(raw), cwd=tmp_path).returncode == 0
    samples = [json.loads(line) for line in read_lines(raw)]
    leaks = sum(FAKE_TOKEN in s["output"] for s in samples)
    assert 1 <= leaks < 10  # the mock teacher leaks a fake token now and then, on purpose
    run = script("02_validate_clean.py", "--input", str(raw), "--output", str(clean))
    assert run.returncode == 0 and f"read 60, kept {60 - leaks}" in run.stdout, run.stdout
    run = script("03_unit_test_gate.py", "--input", str(clean), "--output", str(tested))
    assert run.returncode == 0, run.stderr
    passed = len(read_lines(tested))
    assert 40 <= passed < 60 - leaks  # some answers carry a bug, on purpose
    assert f"passed {passed}, failed {60 - leaks - passed}, timeout 0, untested 0" in run.stdout


def test_validate_drops_every_secret_shape_and_incomplete_samples(tmp_path):
    secrets = ["sk-" + "a" * 40, "AKIA" + "B" * 16, "hf_" + "c" * 34, "github_pat_" + "d" * 30,
               "gho_" + "e" * 36, "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIE\n"]
    samples = [sample(0)] + [sample(i + 1, code=f"KEY = {s!r}\n") for i, s in enumerate(secrets)]
    samples += [{"id": "no-output", "instruction": "x", "input": "y"}, {**sample(9), "output": "  "},
                "[1, 2]", "", "{not json"]
    raw, clean = write_jsonl(tmp_path / "raw.jsonl", samples), tmp_path / "clean.jsonl"
    run = script("02_validate_clean.py", "--input", str(raw), "--output", str(clean))
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in read_lines(clean)] == ["t-0"]
    assert "secret=6" in run.stdout and "missing_fields=2" in run.stdout and "malformed=2" in run.stdout
    # Prose that merely mentions the prefixes is not a secret.
    prose = "# uses sk-learn and hf_hub; AKIA is AWS\ndef f1(x):\n    return x + 1\n"
    write_jsonl(raw, [sample(1, code=prose)])
    assert script("02_validate_clean.py", "--input", str(raw), "--output", str(clean)).returncode == 0
    assert len(read_lines(clean)) == 1


def test_validate_exits_1_when_nothing_survives(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", ["{broken", "also broken"])
    run = script("02_validate_clean.py", "--input", str(raw), "--output", str(tmp_path / "clean.jsonl"))
    assert run.returncode == 1
    assert "kept 0" in run.stdout and run.stderr.strip()
    assert (tmp_path / "clean.jsonl").read_text() == ""


def test_gate_times_out_hung_samples_and_exits_1_when_none_pass(tmp_path):
    samples = [sample(1), sample(2, tests="assert f2(1) == 0\n"),
               sample(3, code="def f3(x):\n    while True:\n        pass\n", tests="assert f3(1)\n"),
               sample(4, code="import sys\ndef f4(x):\n    sys.exit(3)\n", tests="assert f4(1)\n")]
    src, out = write_jsonl(tmp_path / "clean.jsonl", samples), tmp_path / "tested.jsonl"
    run = script("03_unit_test_gate.py", "--input", str(src), "--output", str(out), "--timeout-s", "0.5")
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["id"] for line in read_lines(out)] == ["t-1"]
    assert "passed 1, failed 2, timeout 1" in run.stdout

    write_jsonl(src, samples[1:2])
    run = script("03_unit_test_gate.py", "--input", str(src), "--output", str(out))
    assert run.returncode == 1 and read_lines(out) == []


def test_train_caps_steps_and_fails_on_empty_data(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [sample(i) for i in range(3)])
    val = write_jsonl(tmp_path / "val.jsonl", [])
    run = script("04_train_qlora.py", "--data", str(train), "--val-data", str(val),
                 "--output", str(tmp_path / "lora"), env={"TRAIN_STEPS": "500"})
    assert run.returncode == 0, run.stderr
    assert sum(line.startswith("step ") for line in run.stdout.splitlines()) == 20
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["n_val"] == 0 and metrics["val_loss"] is None

    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    run = script("04_train_qlora.py", "--data", str(empty), "--val-data", str(val),
                 "--output", str(tmp_path / "lora2"))
    assert run.returncode == 1 and "no training data" in run.stderr
    assert not (tmp_path / "lora2" / "final" / "adapter.json").exists()


def test_eval_with_empty_validation_data_reports_null_score(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [sample(1)])
    val = write_jsonl(tmp_path / "val.jsonl", [])
    assert script("04_train_qlora.py", "--data", str(train), "--val-data", str(val),
                  "--output", str(tmp_path / "lora")).returncode == 0
    report = tmp_path / "report.json"
    run = script("05_eval.py", "--adapter", str(tmp_path / "lora" / "final"), "--data", str(val),
                 "--output", str(report), "--round", "4")
    assert run.returncode == 0, run.stderr
    assert json.loads(report.read_text()) == {"round": 4, "n_val": 0, "score": None,
                                              "adapter": str(tmp_path / "lora" / "final")}
    run = script("05_eval.py", "--adapter", str(tmp_path / "missing"), "--data", str(val),
                 "--output", str(report))
    assert run.returncode == 1 and "adapter.json" in run.stderr


# ---- end to end through the CLI ----------------------------------------------------------------

def heidi(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_init_then_run_completes_two_rounds_with_real_stages(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "HEIDI_CONFIG"}
    env.update(PYTHONPATH=str(REPO_ROOT), HEIDI_PYTHON=sys.executable, MAX_CPU_PCT="100",
               MAX_MEM_PCT="100")
    demo = tmp_path / "demo"
    init = heidi("init", str(demo), cwd=tmp_path, env=env)
    assert init.returncode == 0, init.stderr

    run = heidi("run", cwd=demo, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    status = heidi("status", "--json", cwd=demo, env=env)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["status"] == "completed" and view["round"] == 2, view
    verify = heidi("verify", cwd=demo, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    out = demo / "out"
    data = out / "data"
    tested = read_lines(data / "tested_round_1.jsonl")
    train, val = read_lines(data / "train_round_1.jsonl"), read_lines(data / "val_round_1.jsonl")
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(tested)
    raw, clean = read_lines(data / "raw_round_1.jsonl"), read_lines(data / "clean_round_1.jsonl")
    assert len(raw) == 20 and len({json.loads(line)["id"] for line in raw}) == 20
    assert set(tested) <= set(clean) <= set(raw) and 10 <= len(tested) < 20
    assert (out / "out_lora_round_2" / "final" / "adapter.json").is_file()
    report = json.loads((out / "eval" / "report_round_2.json").read_text())
    assert report["round"] == 2 and report["n_val"] == len(read_lines(data / "val_round_2.jsonl"))
    train_log = (out / "logs" / "round_1" / "train.log").read_text()
    assert "step 10/10 loss" in train_log
    generate_log = (out / "logs" / "round_1" / "generate.log").read_text()
    assert "wrote 20 samples (20/20" in generate_log and "mock" in generate_log

    assert FAKE_TOKEN not in (out / "events.jsonl").read_text()
    for log in (out / "logs").rglob("*"):
        if log.is_file():
            assert FAKE_TOKEN not in log.read_text(errors="replace"), log
    for name in ("clean", "tested", "train", "val"):
        for round_ in (1, 2):
            assert FAKE_TOKEN not in (data / f"{name}_round_{round_}.jsonl").read_text()
    events = [json.loads(line) for line in read_lines(out / "events.jsonl")]
    assert events[-1]["event_type"] == "pipeline_complete"
