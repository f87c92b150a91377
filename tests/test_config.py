"""Configuration from the command line's point of view: a bad value is one line on stderr, exit 2
and nothing written; heidi.toml, the environment and --config combine as documented."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOCK = "2026-02-20T07:45:38.307Z"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEIDI_", "RUN_", "OUT_DIR"))}
    for name in ("ROUNDS", "VAL_RATIO", "SEED", "MAX_CPU_PCT", "RUN_UNIT_TESTS"):
        env.pop(name, None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def heidi_cli(*args: str, cwd, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", *args], capture_output=True, text=True,
                          env=_env(**env), cwd=str(cwd), timeout=60)


def _snapshot(top) -> dict:
    """Every file under top with its bytes and mtime, to prove nothing was touched."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            data = open(path, "rb").read() if os.path.isfile(path) else None
            result[os.path.relpath(path, top)] = (data, st.st_mtime_ns, st.st_mode)
    return result


def _state(out) -> dict:
    with open(os.path.join(out, "state.json"), "rb") as fh:
        return orjson.loads(fh.read())


def _assert_one_line(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr.endswith("\n")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in lines[0]
    return lines[0]


# -- bad values from the environment ------------------------------------------------------

BAD_ENV = [
    ("ROUNDS", "abc"), ("ROUNDS", "0"), ("ROUNDS", "-1"), ("ROUNDS", "1.5"), ("ROUNDS", "1e3"),
    ("ROUNDS", " "), ("VAL_RATIO", "2"), ("VAL_RATIO", "nan"), ("VAL_RATIO", "-0.1"),
    ("RUN_ID", "../evil"), ("RUN_ID", "a b"), ("RUN_ID", ".."), ("RUN_ID", "x" * 129),
    ("RUN_ID", "run/1"), ("RUN_UNIT_TESTS", "maybe"), ("HEIDI_MOCK_SUBPROCESSES", "2"),
    ("MAX_CPU_PCT", "0"), ("MAX_MEM_PCT", "101"), ("SEED", "-3"), ("SEED", "0x10"),
    ("HEIDI_MODE", "fast"), ("HEIDI_CLOCK", "yesterday"), ("HEIDI_CLOCK", "2026-02-20T07:45:38+02:00"),
    ("MAX_WALL_TIME_MINUTES", "0"), ("HEIDI_PORT", "70000"),
]


@pytest.mark.parametrize("name,value", BAD_ENV, ids=[f"{n}={v[:12]}" for n, v in BAD_ENV])
def test_bad_env_value_exits_2_with_one_line_and_writes_nothing(tmp_path, name, value):
    out = tmp_path / "out"
    env = {"HEIDI_MOCK_SUBPROCESSES": "1", name: value}
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, **env)
    line = _assert_one_line(result, f"{name}={value!r}")
    assert line.startswith("heidi: ")
    assert "must be" in line  # says what would be accepted
    assert os.listdir(tmp_path) == []  # OUT_DIR not even created


@pytest.mark.parametrize("command", ["tick", "run", "start", "stop"])
def test_bad_value_leaves_an_existing_run_untouched(tmp_path, command):
    out = tmp_path / "out"
    ok = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                   RUN_ID="keep_me")
    assert ok.returncode == 0, ok.stderr
    before = _snapshot(out)
    result = heidi_cli(command, "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       ROUNDS="abc")
    _assert_one_line(result, "ROUNDS", "'abc'")
    assert _snapshot(out) == before


def test_large_rounds_accepted(tmp_path):
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       ROUNDS="5000")
    assert result.returncode == 0, result.stderr
    assert _state(out)["rounds"] == 5000


# -- heidi.toml ----------------------------------------------------------------------------

BAD_TOML = [
    ("rounds = \n", ("heidi.toml", "invalid TOML")),
    ("rounds = 3\nrounds = 4\n", ("heidi.toml", "invalid TOML")),
    ("no_such_setting = 1\n", ("heidi.toml", "no_such_setting")),
    ("rounds = 0\n", ("ROUNDS", "0")),
    ("rounds = \"abc\"\n", ("ROUNDS", "abc")),
    ("rounds = true\n", ("ROUNDS", "True")),
    ("rounds = [1, 2]\n", ("ROUNDS", "[1, 2]")),
    ("val_ratio = nan\n", ("VAL_RATIO", "nan")),
    ("[stages.build]\ncommand = [\"make\"]\n", ("[stages.build]", "unknown stage")),
    ("[stages.train]\ncmd = [\"x\"]\n", ("[stages.train]", "'cmd'")),
    ("[stages]\ntrain = 3\n", ("[stages.train]", "table")),
    ("stages = 3\n", ("[stages]", "table")),
    ("[stages.train]\ncommand = []\n", ("[stages.train]", "command")),
    ("[stages.train]\ncommand = [\"python3\", \"{nope}\"]\n", ("[stages.train]", "{nope}")),
    ("[stages.eval]\ntimeout_s = -1\n", ("[stages.eval]", "timeout_s", "-1")),
    ("[stages.eval]\nenv = { A = true }\n", ("[stages.eval]", "env")),
]


@pytest.mark.parametrize("text,needles", BAD_TOML, ids=[f"toml{i}" for i in range(len(BAD_TOML))])
def test_bad_toml_exits_2_with_one_line_and_writes_nothing(tmp_path, text, needles):
    (tmp_path / "heidi.toml").write_text(text)
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    _assert_one_line(result, *needles)
    assert not out.exists()
    assert os.listdir(tmp_path) == ["heidi.toml"]


def test_invalid_utf8_toml(tmp_path):
    (tmp_path / "heidi.toml").write_bytes(b"base_model = \"\xff\"\n")
    result = heidi_cli("start", "--out-dir", str(tmp_path / "out"), cwd=tmp_path,
                       HEIDI_MOCK_SUBPROCESSES="1")
    _assert_one_line(result, "heidi.toml")
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    result = heidi_cli("start", "--out-dir", str(tmp_path / "out"), "--config",
                       str(tmp_path / "absent.toml"), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    _assert_one_line(result, "absent.toml", "not found")
    assert not (tmp_path / "out").exists()


def test_toml_values_used(tmp_path):
    (tmp_path / "heidi.toml").write_text('rounds = 4\nheidi_mode = "collect"\nrun_unit_tests = true\n')
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    assert result.returncode == 0, result.stderr
    state = _state(out)
    assert (state["rounds"], state["mode"], state["run_unit_tests"]) == (4, "collect", True)


def test_env_overrides_toml(tmp_path):
    (tmp_path / "heidi.toml").write_text('rounds = 4\nheidi_mode = "collect"\n')
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       ROUNDS="7")
    assert result.returncode == 0, result.stderr
    state = _state(out)
    assert (state["rounds"], state["mode"]) == (7, "collect")


def test_env_fixes_a_bad_toml_value(tmp_path):
    (tmp_path / "heidi.toml").write_text("rounds = 0\n")
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       ROUNDS="2")
    assert result.returncode == 0, result.stderr
    assert _state(out)["rounds"] == 2


def test_config_flag_and_heidi_config_env(tmp_path):
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    (elsewhere / "mine.toml").write_text("rounds = 9\n")
    (tmp_path / "heidi.toml").write_text("rounds = 4\n")  # ignored: --config wins
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), "--config", str(elsewhere / "mine.toml"),
                       cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    assert result.returncode == 0, result.stderr
    assert _state(out)["rounds"] == 9
    out2 = tmp_path / "out2"
    result = heidi_cli("start", "--out-dir", str(out2), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       HEIDI_CONFIG=str(elsewhere / "mine.toml"))
    assert result.returncode == 0, result.stderr
    assert _state(out2)["rounds"] == 9


def test_out_dir_from_env_and_toml(tmp_path):
    out = tmp_path / "from_env"
    result = heidi_cli("start", cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1", OUT_DIR=str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "events.jsonl").exists() and (out / "state.json").exists()
    toml_out = tmp_path / "from_toml"
    (tmp_path / "heidi.toml").write_text(f'out_dir = "{toml_out}"\n')
    result = heidi_cli("start", cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    assert result.returncode == 0, result.stderr
    assert (toml_out / "state.json").exists()


# -- run id ----------------------------------------------------------------------------------

def test_run_id_generated_when_unset_and_kept(tmp_path):
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       HEIDI_CLOCK=CLOCK)
    assert result.returncode == 0, result.stderr
    run_id = _state(out)["run_id"]
    assert re.fullmatch(r"run_20260220_074538_[0-9a-f]{8}", run_id), run_id
    assert run_id in result.stdout
    tick = heidi_cli("tick", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1")
    assert tick.returncode == 0, tick.stderr
    assert _state(out)["run_id"] == run_id
    with open(out / "events.jsonl", "rb") as fh:
        events = [orjson.loads(line) for line in fh]
    assert len(events) >= 3
    assert {e["run_id"] for e in events} == {run_id}
    assert events[0]["prev_hash"] == run_id


def test_run_ids_differ_between_runs(tmp_path):
    ids = set()
    for name in ("a", "b"):
        out = tmp_path / name
        result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                           HEIDI_CLOCK=CLOCK)
        assert result.returncode == 0, result.stderr
        ids.add(_state(out)["run_id"])
    assert len(ids) == 2


def test_run_id_honoured(tmp_path):
    out = tmp_path / "out"
    result = heidi_cli("start", "--out-dir", str(out), cwd=tmp_path, HEIDI_MOCK_SUBPROCESSES="1",
                       RUN_ID="my-run_1.2")
    assert result.returncode == 0, result.stderr
    assert _state(out)["run_id"] == "my-run_1.2"
    with open(out / "events.jsonl", "rb") as fh:
        first = orjson.loads(fh.readline())
    assert (first["run_id"], first["prev_hash"]) == ("my-run_1.2", "my-run_1.2")
