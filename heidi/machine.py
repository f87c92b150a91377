"""The loop's state machine (design.md §4): one transition per tick, journaled, crash-safe.

Every change of state is an event: the machine emits events and folds each one into the state
with `apply_event`, and recovery replays the journal through the same function, so state.json
can always be rebuilt from events.jsonl.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any

from . import control
from .archive import Archive
from .clock import Clock, clock_from_env
from .config import MODES, Config
from .errors import RefusedError
from .interrupt import Interrupt
from .journal import (JournalWriter, line_before, read_tail, verify_journal,  # noqa: F401
                      verify_run)
from .lock import RunLock
from .loop import (ACTIVE_STATUSES, ENDED_STATUSES, NEXT_ROUND, STAGE_OF,  # noqa: F401
                   NEW_STATE_KEYS, STATE_OF, STATES, TRANSITIONS, StageContext, StageOutcome,
                   StageRunner, apply_event, empty_state, judge_action, new_run_id, next_state)
from .recovery import Recovery, check_state_file  # noqa: F401
from .status import StatusWriter, status_view
from .waiting import DiskWait, check_room, stderr_line

# What an action the holder applies journals (judge_action says whether it applies).
_ACTION_EVENTS = {"pause": ("pipeline_pause", "Paused; ticks do nothing until resumed"),
                  "resume": ("pipeline_resume", "Resumed"),
                  "train_now": ("train_now", "Train now requested; finalizing the collected data")}


def mock_stage(ctx: StageContext, stage: str, round_: int) -> StageOutcome:
    """HEIDI_MOCK_SUBPROCESSES=1: every stage succeeds at once, with a synthetic usage."""
    seed = (round_ * 31 + len(stage)) % 17
    return StageOutcome(ok=True, usage_delta={
        "memory_mb_delta": 1.0 + seed / 4, "cpu_pct": 10.0 + seed,
        "system_mem_available_kb_delta": -1024 * (seed + 1), "system_cpu_pct": 5.0 + seed / 2,
        "wall_ms": 0.0})


def _real_stage(ctx: StageContext, stage: str, round_: int) -> StageOutcome:
    """heidi.stages.run_stage, imported when a stage runs (a tick with nothing to do, status and
    control commands never load the supervisor)."""
    from .stages import run_stage
    return run_stage(ctx, stage, round_)


class Machine(Recovery, Archive):
    """One run in one OUT_DIR. Use open() (takes the lock), then start()/tick()/actions, close()."""

    def __init__(self, config: Config, clock: Clock | None = None,
                 stage_runner: StageRunner | None = None, interrupt: Interrupt | None = None) -> None:
        self.config = config
        # Set by a signal: the running stage ends and the run is left interrupted (not stopped).
        self.interrupt = interrupt if interrupt is not None else Interrupt()
        self.clock = clock or clock_from_env()
        if stage_runner is None:
            stage_runner = mock_stage if config.mock_subprocesses else _real_stage
        self.stage_runner = stage_runner
        # A Slurm stage's job runs without heidi: True waits for it to end (heidi run, the
        # daemon); False looks at it once per tick and returns (`heidi tick` from cron).
        self.follow_jobs = True
        self.lock = RunLock(config.lock_path)
        self.status_writer = StatusWriter(config.state_path, config.fsync)
        self.state: dict[str, Any] | None = None
        self.journal: JournalWriter | None = None
        # fingerprints of (journal, state.json) as this process last wrote them; None: unknown
        self._seen: tuple[Any, Any] | None = None
        # Set by the daemon and `heidi run`: a full disk is waited out in place, the transition
        # going on where it stopped. None (a tick): a full disk is an error, one line naming the
        # path -- but a stage's outcome is always waited for (see _waiting_for_space).
        self.disk_wait: DiskWait | None = None
        self._journal_path, self._state_path = config.journal_path, config.state_path
        self._control_dir = config.control_dir
        # (monotonic ns, actions left) of the last listing of control/ (see status())
        self._listed: tuple[int, list[str]] | None = None
        self._contexts: dict[tuple[str, str], StageContext] = {}  # see _context
        self._outcome_wait: DiskWait | None = None  # see _WaitingForSpace

    # -- opening, recovery ---------------------------------------------------------------
    def open(self, create: bool = True, verify_chain: bool = False) -> "Machine":
        """Take the run lock (RunLocked if held) and load the run, checking the journal first.

        create=False (tick, control commands) refuses a missing OUT_DIR instead of making one.
        verify_chain=True (`heidi run`, the daemon) checks the whole chain, not only its head.
        Opened again after close(), a Machine keeps the state it holds when neither the journal
        nor state.json changed since it wrote them (fstat only, nothing read).
        """
        if create:
            os.makedirs(self.config.out_dir, mode=0o700, exist_ok=True)
        try:
            self.lock.acquire()
        except FileNotFoundError:
            if create:
                raise
            raise RefusedError(f"no run in {self.config.out_dir}; start one with `heidi start`") from None
        try:
            if verify_chain or not self._reuse():
                if self.lock.reused:
                    # the files changed since this process let go: the lock file may have been
                    # replaced too (OUT_DIR removed and made again), so lock what the path names
                    self.lock.retake()
                self._load(verify_chain)
        except BaseException:
            self.close()
            raise
        return self

    def release(self) -> None:
        """Let go of the run until the next open(): the lock is released, but the state and the
        journal's fd are kept for it when nothing changes on disk in between (Core.tick)."""
        if self.journal is None or self._seen is None or self.journal.pending:
            self.close()
        else:
            self.lock.release(keep=True)  # the next open() only flocks it again

    def close(self) -> None:
        """Write what is held back, release the journal and the lock (the state stays in memory)."""
        try:
            if self.journal is not None:
                journal, self.journal = self.journal, None
                held_back = journal.pending
                try:
                    journal.close()
                except BaseException as exc:
                    self._seen = None
                    # Lines held back are there only because something failed mid-transition
                    # (a full disk, a signal) and was raised already: when they cannot be
                    # written either, the journal stays as the last transition left it.
                    if not (held_back and isinstance(exc, OSError)):
                        raise
        finally:
            self.lock.release()

    def __enter__(self) -> "Machine":
        return self if self.lock.held else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- journal + state -----------------------------------------------------------------
    def _emit(self, event_type: str, message: str = "", **kw: Any) -> None:
        assert self.journal is not None and self.state is not None
        self._seen = None  # the state in memory is ahead of state.json until _save
        self.journal.emit(event_type, message, **kw)
        # Fold what was written (redacted, truncated): replay must give the same state.
        apply_event(self.state, self.journal.last_event)  # type: ignore[arg-type]

    def _io(self, wait: DiskWait | None, fn: Any, *args: Any) -> Any:
        """fn(*args), a full disk waited out when `wait` is set (else its OSError is raised)."""
        return fn(*args) if wait is None else wait.run(fn, *args)

    def _waiting_for_space(self) -> "_WaitingForSpace":
        """Inside, a full disk is waited out even by a tick (one line on stderr): what a stage
        did -- hours of training -- is journaled once there is space, never thrown away."""
        return _WaitingForSpace(self)

    def _save(self) -> None:
        """End a transition: the journal's lines written and fdatasynced (that makes it durable),
        then state.json replaced (not synced: a cache of the journal). On a full disk the
        journal is left as before (a short write cut back, the lines held) and state.json's tmp
        file removed; with disk_wait set it is tried again until it succeeds."""
        self._io(self.disk_wait, self._write_out)

    def _write_out(self) -> None:
        journal, state = self.journal, self.state
        assert journal is not None and state is not None
        journal.sync()
        journal_seen = journal.fingerprint()
        state["round"] = state["current_round"]
        events, hash_, size, offset = journal.position
        # the head as state.json records it; the journal's mtime as this process left it, so
        # that a later write of the same size is seen
        state["journal"] = {"events": events, "head": hash_, "bytes": size,
                            "head_offset": offset, "mtime_ns": journal_seen[3]}
        state_seen = self.status_writer.write(state)
        self._seen = (journal_seen, state_seen)

    # -- starting a run ------------------------------------------------------------------
    def start(self, mode: str | None = None) -> dict[str, Any]:
        """Begin a new run (pipeline_start, round_start of round 1). Refused if one is active."""
        cfg = self.config
        mode = mode or cfg.mode
        if mode not in MODES:
            raise RefusedError(f"mode {mode!r}: must be one of {', '.join(MODES)}")
        run_id = cfg.run_id or new_run_id(self.clock.now())
        if self.state is not None:
            if self.state["status"] in ACTIVE_STATUSES:
                raise RefusedError(f"run {self.state['run_id']} is already {self.state['status']} "
                                   f"(state {self.state['state']}); stop it first or use another --out-dir")
            if run_id == self.state["run_id"]:
                # checked before archiving: a refused start leaves the finished run where it is
                ended = self.state["status"]
                way = ("`heidi continue` takes it up again, or choose another id"
                       if ended in ENDED_STATUSES else "choose another")
                raise RefusedError(f"RUN_ID={run_id!r}: the finished run in {cfg.out_dir} has this "
                                   f"id (status {ended}); {way}")
        if os.path.exists(os.path.join(cfg.out_dir, "runs", run_id)):
            raise RefusedError(f"RUN_ID={run_id!r}: a finished run with this id is archived in "
                               f"{os.path.join(cfg.out_dir, 'runs', run_id)}; choose another")
        if self.state is not None:
            self._archive()
        self.state = empty_state()
        self.journal = JournalWriter(cfg.journal_path, run_id, self.clock, fsync=cfg.fsync,
                                     batch=True)
        self._emit("pipeline_start", f"Starting training pipeline (mode={mode}, rounds={cfg.rounds}, "
                   f"run_unit_tests={int(cfg.run_unit_tests)})")
        self._emit("round_start", "Starting round 1", round=1)
        self.journal.round = 1
        self._save()
        return self.state

    # -- ticking -------------------------------------------------------------------------
    def require_run(self) -> dict[str, Any]:
        if self.state is None:
            raise RefusedError(f"no run in {self.config.out_dir}; start one with `heidi start`")
        return self.state

    def apply_requests(self, before_stop: bool = False) -> None:
        """Apply queued control requests in arrival order; refused ones are dropped with a warn.

        before_stop: only those that arrived before the first queued stop (a stop that ended a
        stage is applied after what was asked before it)."""
        self._listed = None
        listed_ns = time.monotonic_ns()
        requests = control.pending(self._control_dir)
        for i, (path, action) in enumerate(requests):
            if before_stop and action == "stop":
                self._listed = (listed_ns, [a for _, a in requests[i:]])
                return
            try:
                self.act(action)
            except RefusedError as exc:
                self._emit("request_refused", f"{action} refused: {exc}", level="warn")
                self._save()
            control.consume(path)
        self._listed = (listed_ns, [])

    def tick(self) -> bool:
        """Perform at most one transition; True when something advanced."""
        state = self.require_run()
        self.apply_requests()
        if state["state"] in ("IDLE", "ERROR") or state["paused"]:
            if state["paused"] and state["stage_status"] == "running" and state.get("slurm_job"):
                return self._slurm().follow()  # a submitted job runs on while paused: record its end
            return False
        # Room for a transition before one begins: on a full disk a tick appends nothing (a
        # daemon waits here), and no stage is started only to fail for want of space.
        self._io(self.disk_wait, check_room, self.config.out_dir)
        if state["stage_status"] in ("succeeded", "done"):
            # The previous holder died after the stage's work was journaled: finish, don't redo.
            if state["stage_status"] == "succeeded":
                self._emit("stage_end", f"Finished {state['current_stage']}",
                           stage=state["current_stage"])
            if state["stage_status"] == "done":
                self._advance_round()
            self._save()
            return True
        if self.interrupt:
            raise self.interrupt.error()  # a signal came between stages: start no other
        if state["stage_status"] == "running" and state.get("slurm_job"):
            # A Slurm job, submitted (or about to be) by this or an earlier process: find it
            # and follow it; never submit the attempt again.
            return self._slurm().follow()
        if state["stage_status"] == "running":
            # The process that ran this stage died mid-stage: record it, then run it again.
            self._emit("stage_interrupted", f"{state['current_stage']} was interrupted "
                       "(the previous heidi process died); running it again",
                       stage=state["current_stage"] or "pipeline", level="warn")
        self._run_stage()
        return True

    def _run_stage(self) -> None:
        state = self.state
        assert state is not None
        machine_state, round_ = state["state"], state["current_round"]
        stage = STAGE_OF[machine_state]
        if self._slurm_stage(stage):
            self._slurm().start(stage, round_)
            return
        if self.config.mock_subprocesses:
            self._emit("stage_start", f"Starting {stage}", stage=stage)
        else:
            from .stages import stage_paths
            # What the stage will write, and the topmost directory heidi is about to create for
            # it, become the run's own (archived with it, never a user's file) before they exist.
            make, owned = stage_paths(self.config, stage, round_, state["run_id"] or "")
            self._emit("stage_start", f"Starting {stage}", stage=stage, artifact_paths=owned)
            self._save()  # a crash from here on is seen as an interrupted stage
            for path in make:
                self._io(self.disk_wait, _makedirs, path)  # 0700 whatever the umask
        ctx = self._context(stage, state["run_id"] or "")
        # A full disk before the stage's process starts (its log, the train/val split) is
        # raised by the runner: waited out by a daemon (the runner is called again), an error
        # for a tick (the stage runs again at the next one).
        outcome = self._io(self.disk_wait, self.stage_runner, ctx, stage, round_)
        with self._waiting_for_space():
            self._record_outcome(stage, outcome)

    def _context(self, stage: str, run_id: str) -> StageContext:
        """The StageContext of stage in run_id (made once: a mock tick runs a stage each time)."""
        key = (stage, run_id)
        ctx = self._contexts.get(key)
        if ctx is None:
            if len(self._contexts) > 16:
                self._contexts.clear()  # runs come and go in a long-lived daemon
            ctx = self._contexts[key] = StageContext(
                config=self.config, run_id=run_id, stop_requested=self.stop_requested,
                warn=functools.partial(self._stage_warn, stage))
        return ctx

    def _slurm_stage(self, stage: str) -> bool:
        return not self.config.mock_subprocesses and self.config.stages[stage].executor == "slurm"

    def _slurm(self) -> Any:
        from .slurm_stage import SlurmDriver
        return SlurmDriver(self)

    def _record_outcome(self, stage: str, outcome: StageOutcome) -> None:
        """Journal how the running stage ended (local or Slurm) and what follows (one transition)."""
        state = self.state
        assert state is not None
        machine_state, round_ = state["state"], state["current_round"]
        if outcome.stopped and self.interrupt and not control.stop_pending(self._control_dir):
            # A signal ended the process, not the run: the stage stays "running" in the state,
            # so the next holder journals stage_interrupted and runs it again.
            self._emit("pipeline_interrupted", f"{self.interrupt.name} ended {stage} (round "
                       f"{round_}); the run is interrupted, the next heidi process runs {stage} "
                       "again", stage=stage, level="warn", usage_delta=outcome.usage_delta)
            self._save()
            raise self.interrupt.error(f"{stage} was ended")
        if outcome.stopped:
            self.apply_requests(before_stop=True)  # arrival order: what was asked before the stop
            if state["status"] in ACTIVE_STATUSES:
                self._emit("pipeline_stop", f"Stopped during {stage}; the stage was terminated",
                           stage=stage, level="warn", usage_delta=outcome.usage_delta)
            self._drop_requests("stop")
        elif outcome.ok:
            self._emit("script_success", f"{stage} succeeded", stage=stage, level="success",
                       usage_delta=outcome.usage_delta, counters_delta=outcome.counters_delta,
                       artifact_paths=outcome.artifact_paths)
            self._emit("stage_end", f"Finished {stage}", stage=stage)
        elif next_state(machine_state, "failed", state["mode"], state["run_unit_tests"]) != "ERROR":
            # TRANSITIONS lets the loop go on after this failure (a failed eval): a warn, not an error
            self._emit("stage_end", f"{stage} failed, the loop goes on: {self._tail(outcome, 300)}",
                       stage=stage, level="warn", usage_delta=outcome.usage_delta,
                       error=outcome.error or f"{stage} failed")
        else:
            self._emit("pipeline_error", f"{stage} failed: {self._tail(outcome, 400)}",
                       stage=stage, level="error", usage_delta=outcome.usage_delta,
                       error=outcome.error or f"{stage} failed")
        if state["stage_status"] == "done":
            self._advance_round()
        self._save()

    def _tail(self, outcome: StageOutcome, chars: int) -> str:
        """The last `chars` characters of a stage's output, redacted before they are cut: a
        secret cut in two would no longer match its rule (a Slurm stage's reason is not
        redacted yet; a local stage's output already is, and redacting it again changes
        nothing)."""
        assert self.journal is not None
        return self.journal.redact(outcome.output_tail)[-chars:]

    def _stage_warn(self, stage: str, event_type: str, message: str) -> None:
        """StageContext.warn: a warn event about the running stage, durable at once (waiting for
        space if need be: it may come after the stage ran, before its outcome)."""
        self._emit(event_type, message, stage=stage, level="warn")
        with self._waiting_for_space():
            self._save()

    def _advance_round(self) -> None:
        state = self.state
        assert state is not None
        if state["current_round"] < state["rounds"]:
            nxt = state["current_round"] + 1
            self.journal.round = nxt  # type: ignore[union-attr]
            self._emit("round_start", f"Starting round {nxt}", round=nxt)
        else:
            self._emit("pipeline_complete", f"Completed {state['rounds']} rounds",
                       level="success")

    # -- actions -------------------------------------------------------------------------
    def act(self, action: str) -> None:
        """Apply a control action now (the caller holds the lock). RefusedError if it can't."""
        state = self.require_run()
        if not judge_action(action, state):
            return  # already in effect
        if action == "stop" and state.get("slurm_job") and state["stage_status"] == "running":
            # nobody follows the stage's Slurm job: cancel it, then journal the stop
            job = state["slurm_job"]
            usage = self._slurm().stop()
            self._emit("pipeline_stop", f"Stop requested; run stopped; Slurm job "
                       f"{job.get('id') or job['name']} ({job['stage']}) was cancelled",
                       level="warn", stage=job["stage"], usage_delta=usage)
            self._save()
            from .slurm import remove_spool
            remove_spool(self.config.out_dir, job["name"])
            return
        if action == "stop":
            self._emit("pipeline_stop", "Stop requested; run stopped", level="warn",
                       stage=state["current_stage"] or "pipeline")
        elif action == "continue":
            point = state.get("continue_from") or {}
            ended = "failed" if state["status"] == "error" else "stopped"
            where = (f"; {STAGE_OF[point['state']]} of round {state['current_round']} goes on"
                     if point.get("state") in STAGE_OF else "")
            self._emit("pipeline_continue", f"Continuing the {ended} run {state['run_id']}{where}",
                       stage=state["current_stage"] or "pipeline")
        else:
            self._emit(*_ACTION_EVENTS[action])
        self._save()

    def _drop_requests(self, action: str) -> None:
        self._listed = None
        for path, queued in control.pending(self._control_dir):
            if queued == action:
                control.consume(path)

    def stop_requested(self) -> bool:
        """A stop waits in the control queue, or a signal came (checked by stage runners several
        times a second): end the running stage."""
        return bool(self.interrupt) or control.stop_pending(self._control_dir)

    # -- reading -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The status view; its pending requests are those apply_requests left when it listed
        control/ less than a millisecond ago (the view of a tick whose transition took no time:
        a request that lands in between shows in the next view, and is applied the same)."""
        listed = self._listed
        pending = None
        if listed is not None and time.monotonic_ns() - listed[0] < _LISTING_FRESH_NS:
            pending = listed[1]
        return status_view(self.state, self.config, pending)


_LISTING_FRESH_NS = 1_000_000  # how long Machine.status() trusts apply_requests' listing


class _WaitingForSpace:
    """Machine._waiting_for_space(): sets the machine's disk_wait while inside, unless it has
    one (a daemon, `heidi run`). One DiskWait per machine, told the interrupt of the moment."""

    __slots__ = ("machine", "set_here")

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.set_here = False

    def __enter__(self) -> None:
        machine = self.machine
        if machine.disk_wait is None:
            wait = machine._outcome_wait
            if wait is None:
                wait = machine._outcome_wait = DiskWait(machine.interrupt, stderr_line, machine.clock)
            wait.interrupt = machine.interrupt  # Core.tick gives the machine a new one each call
            machine.disk_wait = wait
            self.set_here = True

    def __exit__(self, *exc: object) -> None:
        if self.set_here:
            self.machine.disk_wait = None


def _makedirs(path: str) -> None:
    from .stagelog import makedirs_private
    makedirs_private(path)  # logs/ as well as logs/round_R: 0700 whatever the umask
