"""Talking to Slurm for a stage that runs as a job: the private spool files in OUT_DIR/.slurm,
sbatch, finding a job by its unique name, reading its state (scontrol, then sacct), scancel.
Knows nothing of the journal: heidi.slurm_stage decides what each answer means for the run.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

SPOOL_DIR = ".slurm"   # under OUT_DIR: hidden, so never archived; emptied when each stage ends
CLIENT_TIMEOUT_S = 60.0
# States in which Slurm has finished with a job (COMPLETING is not: processes may still run).
END_STATES = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY",
              "PREEMPTED", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED")
# sbatch options heidi sets itself: a slurm_args entry may not change them.
RESERVED_OPTIONS = ("--job-name", "-J", "--output", "-o", "--error", "-e", "--chdir", "-D",
                    "--open-mode", "--parsable", "--wrap", "--export", "--input", "-i")
# Environment sbatch itself gets (and so the job record in slurmctld): never heidi's secrets.
_CLIENT_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR")
_NAME_OK = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SlurmError(Exception):
    """A Slurm client failed or is missing; the message is one line."""


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says of a job."""

    job_id: str
    state: str             # JobState, first word ("CANCELLED by 0" -> CANCELLED)
    exit_code: int = 0
    signal: int = 0
    run_s: float = 0.0     # RunTime (or Elapsed): seconds the job has been running
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state in END_STATES


def job_name(run_id: str, stage: str, round_: int, attempt: int) -> str:
    """heidi-<run_id>-<stage>-r<round>-a<attempt>: unique per stage attempt, so a job submitted
    by a process that died before journaling its id is found again by name, never resubmitted."""
    return f"heidi-{run_id}-{stage}-r{round_}-a{attempt}"


def spool_path(out_dir: str, name: str, kind: str) -> str:
    """OUT_DIR/.slurm/<job name>.<kind>: env (the stage's environment), out (the job's raw
    output), res (exit code and CPU times), pos (how much of out is in the stage's log)."""
    return os.path.join(out_dir, SPOOL_DIR, f"{name}.{kind}")


def remove_spool(out_dir: str, name: str) -> None:
    """Delete a finished attempt's spool files (the unredacted output among them)."""
    for kind in ("env", "out", "res", "pos", "res.tmp"):
        try:
            os.unlink(spool_path(out_dir, name, kind))
        except FileNotFoundError:
            pass


def available() -> str | None:
    """None when the Slurm clients heidi calls are on PATH, else the one-line reason."""
    for tool in ("sbatch", "scontrol", "scancel", "squeue"):
        if shutil.which(tool) is None:
            return (f"{tool} not found on PATH: a stage with executor = \"slurm\" needs the Slurm "
                    "clients (sbatch, scontrol, scancel, squeue)")
    return None


def time_limit_minutes(timeout_s: float) -> int:
    """sbatch --time: a backstop a little above heidi's own timer (Slurm checks limits about
    every 30 s with minute resolution, so heidi's timer is the one that normally fires)."""
    return math.ceil(timeout_s / 60.0) + 2


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in _CLIENT_ENV or k.startswith(("LC_", "SLURM_", "SBATCH_", "MUNGE_"))}
    env.setdefault("PATH", os.defpath)
    return env


def _client(argv: list[str], stdin: str | None = None,
            pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                              env=_client_env(), timeout=CLIENT_TIMEOUT_S, pass_fds=pass_fds)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{argv[0]} did not answer within {CLIENT_TIMEOUT_S:g} s") from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # cut far beyond an error's length only: the journal redacts a reason before it cuts it
    # to 200 characters (a secret cut in two would no longer match its rule)
    return lines[0][:4096] if lines else "no message"


def write_env_file(path: str, env: dict[str, str]) -> None:
    """The stage's environment as `export K='v'` lines, 0600: the job script sources it, so no
    value is ever on a command line (ps, scontrol) or in slurmctld's job record."""
    lines = [f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()) if _NAME_OK.match(k)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(lines))


def read_env_file(path: str) -> dict[str, str] | None:
    """The environment write_env_file wrote (None when the file is gone)."""
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    env = {}
    for token in shlex.split(text):
        if token != "export":
            key, _, value = token.partition("=")
            env[key] = value
    return env


def job_script(argv: list[str], cwd: str, env_file: str, res_file: str) -> str:
    """The batch script: exactly the stage's environment (plus Slurm's SLURM_* variables), its
    cwd and argv; then the exit code and the children's CPU times (bash `times`) into res_file."""
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        "# written by heidi: runs one stage with the environment a local stage gets",
        "for __heidi_v in $(compgen -e); do",
        '  case "$__heidi_v" in SLURM_*|SLURMD_*) ;; *) unset "$__heidi_v" 2>/dev/null ;; esac',
        "done",
        "unset __heidi_v",
        f". {q(env_file)} || exit 97",
        f"cd {q(cwd)} || exit 98",
        shlex.join(argv),
        "__heidi_rc=$?",
        f"{{ echo \"$__heidi_rc\"; times; }} > {q(res_file + '.tmp')}"
        f" && mv -f {q(res_file + '.tmp')} {q(res_file)}",
        'exit "$__heidi_rc"',
        "",
    ])


def read_result(path: str) -> tuple[int | None, float, float]:
    """(exit code, children's user CPU s, system CPU s) from the job script's res file."""
    try:
        with open(path) as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        return None, 0.0, 0.0
    try:
        code = int(lines[0])
        user, sys_ = (_bash_time(t) for t in lines[2].split()[:2])
    except (ValueError, IndexError):
        return None, 0.0, 0.0
    return code, user, sys_


def _bash_time(text: str) -> float:
    minutes, _, seconds = text.rstrip("s").partition("m")
    return int(minutes) * 60 + float(seconds)


def sbatch(script: str, name: str, out_file: str, cwd: str, timeout_s: float,
           extra: list[str], hold_fd: int | None = None) -> str:
    """Submit; the job id. hold_fd (the run's lock) is inherited by sbatch, so the run stays
    locked until sbatch has returned even when heidi is killed meanwhile: the next holder then
    finds the job by name instead of submitting it again."""
    argv = ["sbatch", "--parsable", f"--job-name={name}", f"--output={out_file}",
            "--open-mode=append", f"--chdir={cwd}", f"--time={time_limit_minutes(timeout_s)}",
            *extra]
    done = _client(argv, stdin=script, pass_fds=(hold_fd,) if hold_fd is not None else ())
    job_id = done.stdout.strip().split(";")[0]
    if done.returncode != 0 or not job_id.isdigit():
        raise SlurmError(f"sbatch failed (exit {done.returncode}): {_first_line(done.stderr or done.stdout)}")
    return job_id


def find_by_name(name: str) -> str | None:
    """The id of the job named `name` (unique per attempt), known to slurmctld or to
    accounting; None when no such job was ever submitted. SlurmError when Slurm cannot say."""
    done = _client(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i"])
    if done.returncode != 0:
        raise SlurmError(f"squeue failed: {_first_line(done.stderr)}")
    ids = done.stdout.split()
    if ids:
        return ids[0]
    for row in _sacct(["--name", name]):
        if row[4] == name:  # sacct -c does not filter by name itself
            return row[0]
    return None


def _sacct(select: list[str]) -> list[list[str]]:
    """Rows (JobID, State, ExitCode, Elapsed, JobName) of the matching jobs (no steps): slurmdbd's
    accounting, else the jobcomp file (`sacct -c`); [] when neither answers."""
    fields = ["-n", "-P", "-X", "-o", "JobID,State,ExitCode,Elapsed,JobName"]
    if shutil.which("sacct") is None:
        return []
    for extra in ([], ["-c"]):
        done = _client(["sacct", *extra, *select, *fields])
        if done.returncode == 0:
            rows = [line.split("|") for line in done.stdout.splitlines() if line.strip()]
            rows = [row for row in rows if len(row) >= 5 and row[0].isdigit()]
            if rows:
                return rows
    return []


def _exit(text: str) -> tuple[int, int]:
    code, _, sig = text.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return 0, 0


def _seconds(text: str) -> float:
    """[D-]HH:MM:SS (or MM:SS) as seconds."""
    days, _, rest = text.rpartition("-")
    total = 0.0
    try:
        for part in rest.split(":"):
            total = total * 60 + float(part)
        return total + (int(days) * 86400 if days else 0)
    except ValueError:
        return 0.0


def job_info(job_id: str) -> JobInfo | None:
    """The job's state: scontrol while slurmctld keeps it (MinJobAge after its end), then sacct.
    JobInfo with state "VANISHED" when neither knows it; None when Slurm cannot be asked now
    (slurmctld down or slow: the caller asks again later)."""
    try:
        done = _client(["scontrol", "show", "job", "-o", job_id])
    except SlurmError:
        return None
    if done.returncode == 0 and "JobState=" in done.stdout:
        fields = dict(tok.split("=", 1) for tok in done.stdout.split() if "=" in tok)
        code, sig = _exit(fields.get("ExitCode", "0:0"))
        return JobInfo(job_id, fields.get("JobState", "UNKNOWN"), code, sig,
                       _seconds(fields.get("RunTime", "0")), fields.get("Reason", ""))
    if "Invalid job id" not in (done.stderr + done.stdout):
        return None  # the controller did not answer: not a verdict on the job
    try:
        rows = _sacct(["-j", job_id])
    except SlurmError:
        return None
    for row in rows:
        if row[0] == job_id:
            code, sig = _exit(row[2])
            return JobInfo(job_id, row[1].split()[0] if row[1] else "UNKNOWN", code, sig,
                           _seconds(row[3]))
    return JobInfo(job_id, "VANISHED")


def scancel(job_id: str, term_all: bool = False) -> None:
    """term_all: SIGTERM to the batch script and every process of the job, which goes on until
    they exit (`--signal=TERM --full`); else end the job (SIGTERM, SIGKILL after KillWait)."""
    argv = ["scancel", "--signal=TERM", "--full", job_id] if term_all else ["scancel", job_id]
    done = _client(argv)
    if done.returncode != 0 and "already completing or completed" not in done.stderr \
            and "Invalid job id" not in done.stderr:
        raise SlurmError(f"scancel {job_id} failed: {_first_line(done.stderr)}")
