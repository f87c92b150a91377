"""A stage that runs as a Slurm job, driven by the machine: journal the attempt's unique job name
(stage_start) before sbatch, the job id after (slurm_submitted), then follow the job from any
later heidi process -- poll, stream its output redacted into the stage's log, time it out, cancel
it on stop -- and journal its end like a local stage's. Never submits one attempt twice.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Any

from . import control, slurm
from ._fast.redact import Redactor
from .counters import ENV_NAME as COUNTERS_ENV
from .counters import prepare as prepare_counters
from .counters import read_counters
from .errors import RefusedError
from .loop import StageOutcome
from .stagelog import StageLog
from .stages import (
    OUTPUT_TAIL_CHARS,
    build_argv,
    child_env,
    placeholders,
    split_round,
    stage_paths,
)

if TYPE_CHECKING:
    from .machine import Machine

POLL_SLICE_S = 0.1       # how often a waiting process looks at stop requests and signals
READ_CHUNK = 1 << 20
CANCEL_WAIT_S = 600.0    # after `scancel`: how long to wait for Slurm to say the job ended

_REASONS = {
    "TIMEOUT": "Slurm's time limit (sbatch --time) ended it",
    "OUT_OF_MEMORY": "it went over its memory limit",
    "CANCELLED": "cancelled by someone other than heidi",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "preempted by another job",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "it missed its deadline",
    "FAILED": "the job script failed",
}


def describe(info: slurm.JobInfo) -> str:
    """One line for pipeline_error: Slurm's state, why, and exit:signal."""
    if info.state == "VANISHED":
        return (f"Slurm job {info.job_id} vanished: neither scontrol nor sacct knows it "
                "(purged from slurmctld without accounting)")
    why = _REASONS.get(info.state, "")
    if info.state == "FAILED" and info.signal == 0:
        why = f"exited with code {info.exit_code}"
    return (f"Slurm job {info.job_id} {info.state}" + (f": {why}" if why else "")
            + f" (exit {info.exit_code}:{info.signal})")


class _SpoolLog:
    """The job's raw output (OUT_DIR/.slurm/<name>.out) streamed, whole lines at a time, through
    the redactor into logs/round_R/<stage>.log; how far it got is kept in <name>.pos, so the
    next process that follows the job goes on where this one stopped."""

    def __init__(self, out_dir: str, name: str, log_path: str, redact: Any) -> None:
        self.out = slurm.spool_path(out_dir, name, "out")
        self.pos_path = slurm.spool_path(out_dir, name, "pos")
        try:
            with open(self.pos_path) as fh:
                self.pos = int(fh.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            self.pos = 0
        self.log = StageLog(log_path, redact)

    def pump(self, final: bool = False) -> None:
        try:
            fh = open(self.out, "rb")
        except FileNotFoundError:
            return
        moved = False
        with fh:
            fh.seek(self.pos)
            while True:
                data = fh.read(READ_CHUNK)
                if not data:
                    break
                cut = len(data) if final or len(data) == READ_CHUNK else data.rfind(b"\n") + 1
                if cut == 0:
                    break  # a line still being written: the next poll takes it whole
                self.log.write(data[:cut])
                self.pos += cut
                moved = True
                if cut < len(data):
                    break
        if moved:
            tmp = self.pos_path + ".tmp"
            with open(tmp, "w") as out:
                out.write(str(self.pos))
            os.replace(tmp, self.pos_path)

    def close(self) -> None:
        self.log.close()


class SlurmDriver:
    """What the machine does for a Slurm stage; uses the machine's journal and state."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.cfg = machine.config

    # -- the job's identity --------------------------------------------------------------------
    def _job(self) -> dict[str, Any]:
        job = self.m.state.get("slurm_job") if self.m.state else None
        assert job, "no Slurm job in the state"
        return job

    def _files(self, name: str, kind: str) -> str:
        return slurm.spool_path(self.cfg.out_dir, name, kind)

    def _stage_env(self, stage: str, round_: int) -> dict[str, str]:
        return child_env(self.cfg, stage, round_, self.m.state["run_id"] or "",  # type: ignore[index]
                         self.cfg.stages[stage].env)

    def _argv(self, stage: str, round_: int) -> list[str]:
        values = placeholders(self.cfg, round_)
        values["run_id"] = self.m.state["run_id"] or ""  # type: ignore[index]
        return build_argv(self.cfg.stages[stage].command, values)

    # -- starting --------------------------------------------------------------------------------
    def start(self, stage: str, round_: int) -> None:
        """Journal the attempt (its unique job name) durably, then submit it."""
        state = self.m.state
        assert state is not None
        attempt = int(state.get("slurm_attempts") or 0) + 1
        name = slurm.job_name(state["run_id"] or "", stage, round_, attempt)
        make, owned = stage_paths(self.cfg, stage, round_, state["run_id"] or "")
        self.m._emit("stage_start", f"Starting {stage} as Slurm job {name}", stage=stage,
                     artifact_paths=owned)
        self.m._save()  # from here on, the next holder looks the job up by name first
        for path in make:
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._submit(stage, round_, name)

    def _submit(self, stage: str, round_: int, name: str) -> bool:
        cfg = self.cfg
        stage_cfg = cfg.stages[stage]
        try:
            if stage == "train":
                split_round(cfg, round_)
            argv = self._argv(stage, round_)
            env = self._stage_env(stage, round_)
            prepare_counters(env[COUNTERS_ENV])
            os.makedirs(os.path.join(cfg.out_dir, slurm.SPOOL_DIR), mode=0o700, exist_ok=True)
            env_file, out_file, res_file = (self._files(name, k) for k in ("env", "out", "res"))
            slurm.remove_spool(cfg.out_dir, name)
            slurm.write_env_file(env_file, env)
            os.close(os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            job_id = slurm.sbatch(slurm.job_script(argv, cfg.out_dir, env_file, res_file), name,
                                  out_file, cfg.out_dir, stage_cfg.timeout_s,
                                  stage_cfg.slurm_args, hold_fd=self.m.lock.fileno())
        except (slurm.SlurmError, ValueError, KeyError, OSError) as exc:
            slurm.remove_spool(cfg.out_dir, name)
            why = f"{stage} could not be submitted to Slurm: {exc}"
            # uncut: the journal redacts the error, then cuts it (a cut secret would not match)
            self.m._record_outcome(stage, StageOutcome(ok=False, error=why, output_tail=why))
            return True
        self.m._emit("slurm_submitted", f"Submitted {stage} as Slurm job {job_id} ({name})",
                     stage=stage)
        self.m._save()
        return self.follow()

    # -- following -------------------------------------------------------------------------------
    def follow(self) -> bool:
        """A tick on a running Slurm stage: find the job (by name when its id never reached the
        journal), then poll it -- once, or until it ends when this process watches (heidi run,
        the daemon). True when the run advanced."""
        job = self._job()
        stage, round_, name = job["stage"], job["round"], job["name"]
        if job.get("id") is None:
            try:
                found = slurm.find_by_name(name)
            except slurm.SlurmError:
                return False  # Slurm cannot say now: never guess, ask again with the next tick
            if found is None:
                return self._submit(stage, round_, name)
            self.m._emit("slurm_submitted", f"Found {stage} as Slurm job {found} ({name}), "
                         "submitted before the previous heidi process died", stage=stage)
            self.m._save()
        return self._watch()

    def _redactor(self, name: str, stage: str, round_: int) -> Any:
        env = slurm.read_env_file(self._files(name, "env"))
        return Redactor(env=env if env is not None else self._stage_env(stage, round_)).redact

    def _log_path(self, stage: str, round_: int) -> str:
        return os.path.join(self.cfg.logs_dir, f"round_{round_}", f"{stage}.log")

    def _watch(self) -> bool:
        job = self._job()
        stage, round_, name, job_id = job["stage"], job["round"], job["name"], job["id"]
        log = _SpoolLog(self.cfg.out_dir, name, self._log_path(stage, round_),
                        self._redactor(name, stage, round_))
        timeout_s = self.cfg.stages[stage].timeout_s
        try:
            while True:
                info = slurm.job_info(job_id)
                log.pump()
                if info is not None and info.ended:
                    return self._finish(info, log)
                if info is not None and info.state != job.get("state"):
                    self.m._emit("slurm_job_state", f"Slurm job {job_id} is {info.state}",
                                 stage=stage)
                    self.m._save()
                    job = self._job()
                if info is not None and info.run_s >= timeout_s:
                    return self._finish(self._cancel(job_id, log), log, why="timeout")
                if control.stop_pending(self.cfg.control_dir):
                    return self._finish(self._cancel(job_id, log), log, why="stop")
                if self.m.interrupt:
                    self.m._emit("pipeline_interrupted", f"{self.m.interrupt.name} ended heidi "
                                 f"while {stage} (round {round_}) runs as Slurm job {job_id}; the "
                                 "job goes on, the next heidi process follows it", stage=stage,
                                 level="warn")
                    self.m._save()
                    raise self.m.interrupt.error(f"Slurm job {job_id} goes on")
                if not self.m.follow_jobs:
                    return False  # a cron tick: looked once, the next tick looks again
                self._nap(self.cfg.slurm_poll_s)
        finally:
            log.close()

    def _nap(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.m.interrupt or control.stop_pending(self.cfg.control_dir):
                return
            time.sleep(min(POLL_SLICE_S, max(0.0, end - time.monotonic())))

    def _cancel(self, job_id: str, log: _SpoolLog) -> slurm.JobInfo:
        """SIGTERM to every process of the job, HEIDI_KILL_GRACE_S, then `scancel` (SIGKILL after
        Slurm's KillWait); returns the job as Slurm last saw it."""
        slurm.scancel(job_id, term_all=True)
        info = self._wait_end(job_id, log, self.cfg.kill_grace_s)
        if info is not None and info.ended:
            return info
        slurm.scancel(job_id)
        info = self._wait_end(job_id, log, CANCEL_WAIT_S)
        return info if info is not None else slurm.JobInfo(job_id, "CANCELLED")

    def _wait_end(self, job_id: str, log: _SpoolLog, seconds: float) -> slurm.JobInfo | None:
        end = time.monotonic() + seconds
        info = None
        while True:
            info = slurm.job_info(job_id) or info
            log.pump()
            if (info is not None and info.ended) or time.monotonic() >= end:
                return info
            time.sleep(0.2)

    # -- ending ----------------------------------------------------------------------------------
    def _finish(self, info: slurm.JobInfo, log: _SpoolLog, why: str | None = None) -> bool:
        """Journal the job's end like a local stage's, then delete the attempt's spool files."""
        job = self._job()
        stage, round_, name = job["stage"], job["round"], job["name"]
        log.pump(final=True)
        log.close()
        outcome = self._outcome(info, stage, round_, name, why)
        self.m._record_outcome(stage, outcome)
        slurm.remove_spool(self.cfg.out_dir, name)  # the journal has it: no raw copy is kept
        return True

    def _usage(self, info: slurm.JobInfo, name: str) -> dict[str, float]:
        _, user_s, sys_s = slurm.read_result(self._files(name, "res"))
        try:
            out_bytes = os.path.getsize(self._files(name, "out"))
        except OSError:
            out_bytes = 0
        return {"wall_ms": round(info.run_s * 1000.0, 3), "cpu_user_s": round(user_s, 3),
                "cpu_sys_s": round(sys_s, 3), "output_bytes": out_bytes}

    def _tail(self, stage: str, round_: int) -> str:
        try:
            with open(self._log_path(stage, round_), "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4 * OUTPUT_TAIL_CHARS))
                return fh.read().decode("utf-8", "replace")[-OUTPUT_TAIL_CHARS:]
        except OSError:
            return ""

    def _outcome(self, info: slurm.JobInfo, stage: str, round_: int, name: str,
                 why: str | None) -> StageOutcome:
        usage, tail = self._usage(info, name), self._tail(stage, round_)
        if why == "stop":
            return StageOutcome(ok=False, stopped=True, error="stopped", usage_delta=usage,
                                output_tail=tail)
        if why == "timeout":
            timeout_s = self.cfg.stages[stage].timeout_s
            return StageOutcome(ok=False, usage_delta=usage, output_tail=tail,
                                error=f"timed out after {timeout_s:g} s (Slurm job {info.job_id} cancelled)")
        if info.state != "COMPLETED" or info.exit_code != 0:
            return StageOutcome(ok=False, usage_delta=usage, output_tail=tail or describe(info),
                                error=describe(info))
        counters_file = counters_path_of(self.cfg, stage, round_)
        counters, problem = read_counters(counters_file)
        if problem is not None:
            self.m._emit("counters_invalid", problem, stage=stage, level="warn")
        if stage == "train":
            counters = {**counters, **_split_counts(self.cfg, round_)}
        argv = self._argv(stage, round_)
        artifacts = [os.path.relpath(p, self.cfg.out_dir) for p in _outputs(argv, self.cfg.out_dir)
                     if os.path.exists(p)]
        return StageOutcome(ok=True, usage_delta=usage, counters_delta=counters,
                            artifact_paths=artifacts, output_tail=tail)

    # -- heidi stop while nobody follows the job -------------------------------------------------
    def stop(self) -> dict[str, float]:
        """`heidi stop` applied by a process that does not follow the job: cancel it (by name
        when its id never reached the journal), stream what it printed; the usage to journal
        with pipeline_stop. RefusedError when Slurm cannot cancel it now."""
        job = self._job()
        stage, round_, name, job_id = job["stage"], job["round"], job["name"], job.get("id")
        try:
            if job_id is None:
                job_id = slurm.find_by_name(name)
            if job_id is None:
                slurm.remove_spool(self.cfg.out_dir, name)
                return {}
            log = _SpoolLog(self.cfg.out_dir, name, self._log_path(stage, round_),
                            self._redactor(name, stage, round_))
            try:
                info = self._cancel(job_id, log)
                log.pump(final=True)
            finally:
                log.close()
        except slurm.SlurmError as exc:
            raise RefusedError(f"cannot stop: Slurm job {job_id or name} of {stage} could not be "
                               f"cancelled ({exc}); try again") from None
        return self._usage(info, name)


def counters_path_of(cfg: Any, stage: str, round_: int) -> str:
    from .counters import counters_path
    return counters_path(cfg.logs_dir, round_, stage)


def _split_counts(cfg: Any, round_: int) -> dict[str, int]:
    """train_samples / val_samples, counted from the split files (FINALIZING made them before
    the submission, maybe in another process)."""
    counts = {}
    for kind in ("train", "val"):
        try:
            with open(os.path.join(cfg.data_dir, f"{kind}_round_{round_}.jsonl"), "rb") as fh:
                counts[f"{kind}_samples"] = sum(1 for line in fh if line.strip())  # as split_file
        except OSError:
            pass
    return counts


def _outputs(argv: list[str], out_dir: str) -> list[str]:
    """The paths the stage was asked to write (after --output), as a local stage's artifacts."""
    return [v if os.path.isabs(v) else os.path.join(out_dir, v)
            for flag, v in itertools.pairwise(argv) if flag == "--output"]
