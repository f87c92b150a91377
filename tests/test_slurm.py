"""Stages on a real single-node Slurm (slurmctld + slurmd + munged, started once per session):
a full round with train as a job, cron ticks that return while it runs, SIGKILL of heidi
mid-job without a second submission, timeout and stop cancelling the job and its detached
grandchild, a failing job's tail in the journal, secrets kept out of every file heidi keeps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import orjson
import pytest

import slurm_cluster
from helpers_loop import REPO
from test_stages import CONTRACT, _alive, _wait_for

pytestmark = pytest.mark.skipif(slurm_cluster.missing() is not None,
                                reason=f"no test Slurm: {slurm_cluster.missing()}")

SECRET = "sk-" + "S3cr3t" * 8


@pytest.fixture(scope="session")
def cluster():
    root = tempfile.mkdtemp(prefix="heidi-slurm-")
    c = slurm_cluster.Cluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        subprocess.run(["rm", "-rf", root])


@pytest.fixture
def pipeline(tmp_path, cluster):
    """A repo with the contract scripts; train runs on Slurm (heidi.toml); the CLI against it."""
    scripts = tmp_path / "repo" / "scripts"
    scripts.mkdir(parents=True)
    for name, body in CONTRACT.items():
        (scripts / name).write_text(textwrap.dedent(body))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEIDI_", "RUN_", "OUT_DIR", "SLURM_"))}
    env.update(PYTHONPATH=REPO, HEIDI_PYTHON=sys.executable, HEIDI_REPO_ROOT=str(tmp_path / "repo"),
               OUT_DIR=str(out), ROUNDS="1", SAMPLES_PER_ROUND="10", HEIDI_FSYNC="0",
               MAX_CPU_PCT="100", MAX_MEM_PCT="100", HEIDI_KILL_GRACE_S="1",
               HEIDI_SLURM_POLL_S="0.2", SLURM_CONF=cluster.conf,
               RUN_ID=f"t{os.getpid()}-{tmp_path.name[-12:]}".replace("_", "-"))

    class Pipeline:
        root = tmp_path
        out_dir = out
        environ = env
        slurm = cluster

        def toml(self, train: str = "", **stages: str) -> None:
            text = f'[stages.train]\nexecutor = "slurm"\n{textwrap.dedent(train)}'
            for name, body in stages.items():
                text += f"\n[stages.{name}]\n{textwrap.dedent(body)}"
            path = tmp_path / "heidi.toml"
            path.write_text(text)
            env["HEIDI_CONFIG"] = str(path)

        def cli(self, *args, timeout=120, **extra):
            return subprocess.run([sys.executable, "-m", "heidi", *args], env={**env, **extra},
                                  cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)

        def popen(self, *args, **extra):
            return subprocess.Popen([sys.executable, "-m", "heidi", *args], env={**env, **extra},
                                    cwd=str(tmp_path), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)

        def events(self):
            with open(out / "events.jsonl", "rb") as fh:
                return [orjson.loads(line) for line in fh]

        def types(self):
            return [e["event_type"] for e in self.events()]

        def status(self):
            return orjson.loads(self.cli("status", "--json").stdout)

        def submissions(self) -> int:
            return cluster.submissions(env["RUN_ID"])

        def job_ids(self) -> list[str]:
            return [e["message"].split("Slurm job ")[1].split()[0] for e in self.events()
                    if e["event_type"] == "slurm_submitted"]

        def verify(self):
            res = self.cli("verify")
            assert res.returncode == 0, res.stdout + res.stderr
            res = self.cli("verify", str(out))
            assert res.returncode == 0, res.stdout + res.stderr

    yield Pipeline()
    ids = [e["message"].split("Slurm job ")[1].split()[0] for e in Pipeline().events()
           if e["event_type"] == "slurm_submitted"] if (out / "events.jsonl").exists() else []
    if ids:
        subprocess.run(["scancel", *ids], env=cluster.env, capture_output=True)


def _no_spool_left(out) -> None:
    spool = out / ".slurm"
    assert not spool.exists() or os.listdir(spool) == []


def test_a_full_round_with_train_on_slurm(pipeline):
    pipeline.toml()
    res = pipeline.cli("run", "--json")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["status"] == "completed"
    types = pipeline.types()
    i = types.index("slurm_submitted")
    assert types[i - 1] == "stage_start" and types[i + 1:i + 4].count("script_success") == 1
    evs = pipeline.events()
    start = [e for e in evs if e["event_type"] == "stage_start" and e["stage"] == "train"][0]
    assert f"as Slurm job heidi-{pipeline.environ['RUN_ID']}-train-r1-a1" in start["message"]
    ok = [e for e in evs if e["event_type"] == "script_success" and e["stage"] == "train"][0]
    assert ok["counters_delta"] == {"train_samples": 9, "val_samples": 1}
    assert ok["artifact_paths"] == ["out_lora_round_1"]
    assert ok["usage_delta"]["wall_ms"] >= 0 and "cpu_user_s" in ok["usage_delta"]
    out = pipeline.out_dir
    assert (out / "out_lora_round_1" / "final" / "adapter.bin").exists()
    assert "train lines 9 val lines 1" in (out / "logs" / "round_1" / "train.log").read_text()
    assert pipeline.submissions() == 1
    _no_spool_left(out)
    pipeline.verify()


def test_a_bad_slurm_args_is_a_config_error(pipeline):
    pipeline.toml('slurm_args = "--partition=gpu"\n')
    res = pipeline.cli("start")
    assert res.returncode == 2 and "slurm_args" in res.stderr and len(res.stderr.splitlines()) == 1
    pipeline.toml('slurm_args = ["--output=/tmp/x"]\n')
    res = pipeline.cli("start")
    assert res.returncode == 2 and "heidi sets --output itself" in res.stderr
