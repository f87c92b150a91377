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
        subprocess.run(["rm", "-rf", root], check=False)


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
                                  cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout, check=False)

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
        subprocess.run(["scancel", *ids], env=cluster.env, capture_output=True, check=False)


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
    start = next(e for e in evs if e["event_type"] == "stage_start" and e["stage"] == "train")
    assert f"as Slurm job heidi-{pipeline.environ['RUN_ID']}-train-r1-a1" in start["message"]
    ok = next(e for e in evs if e["event_type"] == "script_success" and e["stage"] == "train")
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


SLEEPY = '''command = ["/bin/sh", "-c", "echo started; sleep {s}; echo finished"]
'''


def _job_running(pipeline):
    view = pipeline.status()
    slurm = view.get("slurm") or {}
    return slurm if slurm.get("state") == "RUNNING" else None


def test_cron_ticks_return_while_the_job_runs_and_finish_the_run(pipeline):
    pipeline.toml(SLEEPY.format(s=3))
    assert pipeline.cli("start").returncode == 0
    seen_running = False
    started = time.monotonic()
    while pipeline.status()["status"] != "completed":
        t0 = time.monotonic()
        res = pipeline.cli("tick")
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
        assert time.monotonic() - t0 < 10  # a tick never waits for the job
        view = pipeline.status()
        if "slurm" in view:
            assert view["status"] == "running" and not view["interrupted"]
            assert view["stage"] == "train" and view["slurm"]["job_id"].isdigit()
            seen_running = seen_running or view["slurm"]["state"] == "RUNNING"
        assert time.monotonic() - started < 90
        time.sleep(0.3)
    assert seen_running
    assert pipeline.submissions() == 1
    assert "finished" in (pipeline.out_dir / "logs" / "round_1" / "train.log").read_text()
    _no_spool_left(pipeline.out_dir)
    pipeline.verify()


def test_sigkill_of_heidi_run_mid_job_then_a_tick_records_its_end_without_resubmitting(pipeline):
    pipeline.toml(SLEEPY.format(s=4))
    proc = pipeline.popen("run")
    try:
        _wait_for(lambda: _job_running(pipeline), 60, "the train job to run")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    view = pipeline.status()
    assert view["status"] == "running" and not view["interrupted"] and view["slurm"]["state"] == "RUNNING"
    assert pipeline.slurm.queue() == [view["slurm"]["job_id"]]  # the job goes on without heidi
    _wait_for(lambda: not pipeline.slurm.queue(), 60, "the job to end")
    res = pipeline.cli("run", "--json")
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["status"] == "completed"
    types = pipeline.types()
    assert "stage_interrupted" not in types and types.count("slurm_submitted") == 1
    assert pipeline.submissions() == 1
    log = (pipeline.out_dir / "logs" / "round_1" / "train.log").read_text()
    assert log.count("started") == 1 and log.count("finished") == 1
    pipeline.verify()


def test_a_death_between_journaled_attempt_and_sbatch_answer_finds_the_job_by_name(pipeline, monkeypatch):
    """In process: sbatch submits, then heidi 'dies' before slurm_submitted is journaled; the
    next tick finds the job by its unique name. Then a death before sbatch ran: the next tick
    submits (once)."""
    from heidi import core, slurm
    from heidi.config import Config
    pipeline.toml(SLEEPY.format(s=1))
    for key, value in pipeline.environ.items():
        monkeypatch.setenv(key, value)
    cfg = Config.load(pipeline.environ["HEIDI_CONFIG"])
    core.start(cfg)
    core.tick(cfg, steps=2)  # generate, validate
    real = slurm.sbatch

    class Died(BaseException):
        pass

    def submit_then_die(*args, **kw):
        real(*args, **kw)
        raise Died

    monkeypatch.setattr(slurm, "sbatch", submit_then_die)
    with pytest.raises(Died):
        core.tick(cfg)
    monkeypatch.setattr(slurm, "sbatch", real)
    assert "slurm_submitted" not in pipeline.types() and pipeline.submissions() == 1
    core.tick(cfg)
    found = [e for e in pipeline.events() if e["event_type"] == "slurm_submitted"]
    assert len(found) == 1 and found[0]["message"].startswith("Found train as Slurm job")
    view = core.run(cfg)
    assert view["status"] == "completed" and pipeline.submissions() == 1
    pipeline.verify()


def test_a_death_before_sbatch_ran_submits_once(pipeline, monkeypatch):
    from heidi import core, slurm
    from heidi.config import Config
    pipeline.toml(SLEEPY.format(s=0))
    for key, value in pipeline.environ.items():
        monkeypatch.setenv(key, value)
    cfg = Config.load(pipeline.environ["HEIDI_CONFIG"])
    core.start(cfg)
    core.tick(cfg, steps=2)
    real = slurm.sbatch

    class Died(BaseException):
        pass

    def die(*args, **kw):
        raise Died

    monkeypatch.setattr(slurm, "sbatch", die)
    with pytest.raises(Died):
        core.tick(cfg)
    monkeypatch.setattr(slurm, "sbatch", real)
    assert pipeline.submissions() == 0
    assert core.run(cfg)["status"] == "completed"
    assert pipeline.types().count("slurm_submitted") == 1
    assert pipeline.submissions() == 1, pipeline.slurm.run("scontrol", "show", "job", "-o")


# The job leaves a detached grandchild that ignores SIGTERM: only proctrack/cgroup ends it.
STUBBORN = '''command = ["/bin/sh", "-c", "setsid sh -c 'trap \\"\\" TERM; exec sleep 300' & echo $! > {pid}; echo started; sleep 300"]
'''


def _grandchild(path) -> int:
    return _wait_for(lambda: path.exists() and path.read_text().strip() and int(path.read_text()),
                     60, "the grandchild's pid")


def test_timeout_cancels_the_job_and_its_detached_grandchild(pipeline):
    pid_file = pipeline.root / "grandchild.pid"
    pipeline.toml(STUBBORN.format(pid=pid_file) + "timeout_s = 3\n")
    res = pipeline.cli("run")
    assert res.returncode != 0
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"]
    assert len(err) == 1 and err[0]["error"].startswith("timed out after 3 s")
    assert "started" in err[0]["message"]
    pid = _grandchild(pid_file)
    assert pipeline.slurm.queue() == []
    _wait_for(lambda: not _alive(pid), 30, "the grandchild to die")
    _no_spool_left(pipeline.out_dir)
    pipeline.verify()


def test_heidi_stop_cancels_a_job_nobody_follows(pipeline):
    pid_file = pipeline.root / "grandchild.pid"
    pipeline.toml(STUBBORN.format(pid=pid_file))
    assert pipeline.cli("start").returncode == 0
    for _ in range(3):
        assert pipeline.cli("tick").returncode == 0
    _wait_for(lambda: (pipeline.cli("tick"), _job_running(pipeline))[1], 60, "the job to run")
    pid = _grandchild(pid_file)
    res = pipeline.cli("stop")
    assert res.returncode == 0, res.stderr
    assert pipeline.status()["status"] == "stopped" and "slurm" not in pipeline.status()
    stop = [e for e in pipeline.events() if e["event_type"] == "pipeline_stop"]
    assert len(stop) == 1 and "was cancelled" in stop[0]["message"]
    assert pipeline.slurm.queue() == []
    _wait_for(lambda: not _alive(pid), 30, "the grandchild to die")
    assert "started" in (pipeline.out_dir / "logs" / "round_1" / "train.log").read_text()
    _no_spool_left(pipeline.out_dir)
    pipeline.verify()


def test_heidi_stop_while_heidi_run_follows_the_job(pipeline):
    pipeline.toml(SLEEPY.format(s=300))
    proc = pipeline.popen("run")
    try:
        _wait_for(lambda: _job_running(pipeline), 60, "the job to run")
        res = pipeline.cli("stop")
        assert res.returncode == 0, res.stderr
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert pipeline.status()["status"] == "stopped"
    stop = [e for e in pipeline.events() if e["event_type"] == "pipeline_stop"]
    assert len(stop) == 1 and stop[0]["stage"] == "train"
    assert pipeline.slurm.queue() == []
    pipeline.verify()


def test_a_failing_job_tail_in_the_journal_and_no_secret_in_any_file(pipeline):
    pipeline.toml('''command = ["/bin/sh", "-c", "echo line one; echo key=$OPENAI_API_KEY; echo boom >&2; exit 3"]
''')
    res = pipeline.cli("run", OPENAI_API_KEY=SECRET)
    assert res.returncode != 0
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"]
    assert len(err) == 1 and err[0]["stage"] == "train"
    assert err[0]["error"].startswith("Slurm job ") and "FAILED" in err[0]["error"]
    assert "exit 3:0" in err[0]["error"]
    assert "line one" in err[0]["message"] and "boom" in err[0]["message"]
    log = (pipeline.out_dir / "logs" / "round_1" / "train.log").read_text()
    assert "key=" in log and SECRET not in log
    _no_spool_left(pipeline.out_dir)
    for dirpath, _, files in os.walk(pipeline.root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                assert SECRET.encode() not in fh.read(), os.path.join(dirpath, name)
    pipeline.verify()


def test_a_job_cancelled_by_someone_else_is_a_clear_error(pipeline):
    pipeline.toml(SLEEPY.format(s=300))
    proc = pipeline.popen("run")
    try:
        job = _wait_for(lambda: _job_running(pipeline), 60, "the job to run")
        subprocess.run(["scancel", job["job_id"]], env=pipeline.slurm.env, check=True)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = [e for e in pipeline.events() if e["event_type"] == "pipeline_error"]
    assert len(err) == 1 and "CANCELLED: cancelled by someone other than heidi" in err[0]["error"]


def test_sigterm_of_the_daemon_leaves_the_job_running_for_the_next_holder(pipeline):
    pipeline.toml(SLEEPY.format(s=4))
    proc = pipeline.popen("daemon", "--port", "0")
    try:
        job = _wait_for(lambda: _job_running(pipeline), 60, "the daemon's train job to run")
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = pipeline.events()[-1]
    assert last["event_type"] == "pipeline_interrupted" and "the job goes on" in last["message"]
    assert pipeline.slurm.queue() == [job["job_id"]]
    res = pipeline.cli("run", "--json")
    assert res.returncode == 0 and orjson.loads(res.stdout)["status"] == "completed", res.stderr
    assert pipeline.submissions() == 1
    pipeline.verify()


def test_a_paused_run_still_records_its_jobs_end_and_starts_nothing_new(pipeline):
    pipeline.toml(SLEEPY.format(s=2))
    assert pipeline.cli("start").returncode == 0
    _wait_for(lambda: (pipeline.cli("tick"), _job_running(pipeline))[1], 60, "the job to run")
    assert pipeline.cli("pause").returncode == 0
    _wait_for(lambda: (pipeline.cli("tick"), "slurm" not in pipeline.status())[1], 60,
              "the job's end to be journaled")
    view = pipeline.status()
    assert view["status"] == "paused" and view["state"] == "EVALUATING"
    assert view["stage_status"] == "pending" and pipeline.types().count("stage_start") == 3
    assert pipeline.cli("resume").returncode == 0
    assert orjson.loads(pipeline.cli("run", "--json").stdout)["status"] == "completed"
