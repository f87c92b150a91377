"""Slurm stages without a cluster: the heidi.toml keys, the journal lines that carry a job and how
they fold into the state (the same by replay), the status view and /metrics."""
from __future__ import annotations

import pytest

from heidi.config import Config
from heidi.daemon.metrics import render_metrics
from heidi.errors import ConfigError
from heidi.loop import apply_event, empty_state
from heidi.slurm import (
    JobInfo,
    job_name,
    job_script,
    read_env_file,
    time_limit_minutes,
    write_env_file,
)
from heidi.slurm_stage import describe
from heidi.status import status_view


def _load(tmp_path, toml: str, **env):
    path = tmp_path / "heidi.toml"
    path.write_text(toml)
    return Config.load(str(path), environ={"HEIDI_MOCK_SUBPROCESSES": "1", **env},
                       overrides={"OUT_DIR": str(tmp_path / "out")})


def test_executor_and_slurm_args(tmp_path):
    cfg = _load(tmp_path, '[stages.train]\nexecutor = "slurm"\nslurm_args = ["--partition=gpu", "--gres=gpu:1"]\n')
    assert cfg.stages["train"].executor == "slurm" and cfg.stages["eval"].executor == "local"
    assert cfg.stages["train"].slurm_args == ["--partition=gpu", "--gres=gpu:1"]
    cfg = _load(tmp_path, '[stages.eval]\nexecutor = "local"\n', HEIDI_EXECUTOR="slurm")
    assert cfg.stages["train"].executor == "slurm" and cfg.stages["eval"].executor == "local"


@pytest.mark.parametrize("table, says", [
    ('executor = "k8s"', "executor='k8s': must be one of local, slurm"),
    ('slurm_args = "--partition=gpu"', "slurm_args='--partition=gpu': must be a list"),
    ('slurm_args = [1]', "must be a list of non-empty strings"),
    ('slurm_args = ["-o", "x"]', "heidi sets -o itself"),
    ('slurm_args = ["--job-name=x"]', "heidi sets --job-name itself"),
    ('slurm_args = ["--export=ALL"]', "heidi sets --export itself"),
])
def test_bad_slurm_settings_are_one_line_errors(tmp_path, table, says):
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f"[stages.train]\n{table}\n")
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_missing_sbatch_is_a_config_error(tmp_path, monkeypatch):
    path = tmp_path / "heidi.toml"
    path.write_text('[stages.train]\nexecutor = "slurm"\n')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="sbatch not found on PATH"):
        Config.load(str(path), environ={}, overrides={"OUT_DIR": str(tmp_path / "out")})


def _event(kind, message="", stage="train", round_=1, level="info"):
    return {"event_type": kind, "message": message, "stage": stage, "round": round_,
            "level": level, "ts": "2026-01-01T00:00:00.000Z", "counters_delta": {},
            "usage_delta": {}, "error": None, "run_id": "r1"}


def test_the_job_folds_into_the_state_and_out_at_its_end():
    state = empty_state()
    apply_event(state, _event("pipeline_start", "x (mode=full, rounds=1, run_unit_tests=0)", "pipeline"))
    apply_event(state, _event("round_start", "Starting round 1", "pipeline"))
    name = job_name("r1", "train", 1, 1)
    apply_event(state, _event("stage_start", f"Starting train as Slurm job {name}"))
    assert state["slurm_job"] == {"name": name, "id": None, "state": None, "stage": "train", "round": 1}
    assert state["slurm_attempts"] == 1
    apply_event(state, _event("slurm_submitted", f"Submitted train as Slurm job 42 ({name})"))
    apply_event(state, _event("slurm_job_state", "Slurm job 42 is RUNNING"))
    assert state["slurm_job"]["id"] == "42" and state["slurm_job"]["state"] == "RUNNING"
    apply_event(state, _event("slurm_job_state", "Slurm job 7 is FAILED"))  # not this job's
    assert state["slurm_job"]["state"] == "RUNNING"
    apply_event(state, _event("script_success", "train succeeded", level="success"))
    assert state["slurm_job"] is None and state["stage_status"] == "succeeded"


def test_status_and_metrics_show_the_job(tmp_path):
    cfg = Config.load(None, environ={}, overrides={"OUT_DIR": str(tmp_path), "HEIDI_MOCK_SUBPROCESSES": 1})
    state = empty_state()
    state.update(run_id="r1", status="running", state="FINALIZING", stage_status="running",
                 current_stage="train", slurm_job={"name": "heidi-r1-train-r1-a1", "id": "42",
                                                   "state": "RUNNING", "stage": "train", "round": 1})
    view = status_view(state, cfg)
    assert view["slurm"] == {"job_id": "42", "state": "RUNNING", "name": "heidi-r1-train-r1-a1"}
    assert view["status"] == "running" and not view["interrupted"]  # nobody holds it: the job runs
    assert 'heidi_slurm_job{job_id="42",state="RUNNING"} 1' in render_metrics(view)
    state["slurm_job"] = None
    assert "slurm" not in status_view(state, cfg)
    assert "heidi_slurm_job{" not in render_metrics(status_view(state, cfg))


def test_env_file_round_trip_and_job_script(tmp_path):
    env = {"A": "x y", "B": "it's\n$HOME `q`", "SECRET": "sk-1", "not-a-name": "z"}
    path = str(tmp_path / "e.env")
    write_env_file(path, env)
    assert (tmp_path / "e.env").stat().st_mode & 0o777 == 0o600
    assert read_env_file(path) == {k: v for k, v in env.items() if k != "not-a-name"}
    script = job_script(["/bin/echo", "a b"], "/out dir", path, "/r")
    assert "sk-1" not in script and "'/out dir'" in script and "'a b'" in script


def test_describe_and_time_limit():
    assert describe(JobInfo("5", "FAILED", 3, 0)) == "Slurm job 5 FAILED: exited with code 3 (exit 3:0)"
    assert describe(JobInfo("5", "OUT_OF_MEMORY", 0, 9)).endswith("memory limit (exit 0:9)")
    assert "vanished" in describe(JobInfo("5", "VANISHED"))
    assert time_limit_minutes(3) == 3 and time_limit_minutes(3600) == 62
