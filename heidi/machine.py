"""The loop's state machine (design.md §4): one transition per tick, journaled, crash-safe.

Every change of state is an event: the machine emits events and folds each one into the state
with `apply_event`, and recovery replays the journal through the same function, so state.json
can always be rebuilt from events.jsonl.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
from typing import Any

from . import control
from ._fast import chain as _chain
from .archive import owned_paths
from .clock import Clock, clock_from_env
from .config import MODES, Config
from .errors import RefusedError, StateError
from .interrupt import Interrupt
from .journal import JournalWriter, read_tail, verify_run  # noqa: F401
from .lock import RunLock
from .loop import (ACTIVE_STATUSES, ENDED_STATUSES, NEXT_ROUND, STAGE_OF,  # noqa: F401
                   STATE_OF, STATES, TRANSITIONS, StageContext, StageOutcome, StageRunner,
                   apply_event, empty_state, judge_action, new_run_id, next_state)
from .status import StatusWriter, read_state, status_view

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


class Machine:
    """One run in one OUT_DIR. Use open() (takes the lock), then start()/tick()/actions, close()."""

    def __init__(self, config: Config, clock: Clock | None = None,
                 stage_runner: StageRunner | None = None, interrupt: Interrupt | None = None) -> None:
        self.config = config
        # Set by a signal: the running stage ends and the run is left interrupted (not stopped).
        self.interrupt = interrupt if interrupt is not None else Interrupt()
        self.clock = clock or clock_from_env()
        if stage_runner is None:
            if config.mock_subprocesses:
                stage_runner = mock_stage
            else:
                from .stages import run_stage
                stage_runner = run_stage
        self.stage_runner = stage_runner
        self.lock = RunLock(config.lock_path)
        self.status_writer = StatusWriter(config.state_path, config.fsync)
        self.state: dict[str, Any] | None = None
        self.journal: JournalWriter | None = None

    # -- opening, recovery ---------------------------------------------------------------
    def open(self, create: bool = True) -> "Machine":
        """Take the run lock (RunLocked if held) and load the run, recovering it if needed.

        create=False (tick, control commands) refuses a missing OUT_DIR instead of making one.
        """
        if not create and not os.path.isdir(self.config.out_dir):
            raise RefusedError(f"no run in {self.config.out_dir}; start one with `heidi start`")
        os.makedirs(self.config.out_dir, mode=0o700, exist_ok=True)
        self.lock.acquire()
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.lock.release()

    def __enter__(self) -> "Machine":
        return self if self.lock.held else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        cfg = self.config
        journal_exists = os.path.exists(cfg.journal_path) and os.path.getsize(cfg.journal_path) > 0
        try:
            state = read_state(cfg.state_path)
            if state is not None and not isinstance(state.get("journal"), dict):
                raise StateError(f"{cfg.state_path}: not a heidi state (no journal head)")
        except StateError:
            if not journal_exists:
                raise
            # state.json is derived from the journal: keep the damaged copy, rebuild the state.
            n = 1
            while os.path.exists(f"{cfg.state_path}.corrupt-{n}"):
                n += 1
            os.rename(cfg.state_path, f"{cfg.state_path}.corrupt-{n}")
            state = None
        if state is None and not journal_exists:
            self.state = None
            return
        if state is not None and state.get("run_id") and not journal_exists:
            raise StateError(f"{cfg.state_path} names run {state.get('run_id')!r} but "
                             f"{cfg.journal_path} is missing or empty")
        run_id = state["run_id"] if state else self._journal_run_id()
        head = state.get("journal", {}) if state else {}
        self.journal = JournalWriter(cfg.journal_path, run_id, self.clock, fsync=cfg.fsync,
                                     batch=True,
                                     head=(head.get("events", 0), head.get("head")) if state else None,
                                     round=state.get("current_round", 0) if state else 0)
        repaired = self.journal.repaired is not None
        if state is None or head.get("head") != self.journal.prev_hash or repaired:
            if state is not None and head.get("events", 0) > self.journal.count:
                raise StateError(f"{cfg.journal_path} has {self.journal.count} events but "
                                 f"state.json records {head.get('events')}: the journal was cut "
                                 "short; run `heidi verify`")
            state = self._replay()
            self.state = state
            self._emit("state_recovered",
                       f"state.json rebuilt from the journal ({state['journal']['events']} events)",
                       level="warn")
            self._save()
        self.state = state
        self.journal.round = state["current_round"]
        if state["status"] == "running" and state["state"] == "IDLE" and state["current_round"] == 0:
            # The starting process died between pipeline_start and round_start: finish the start.
            self._advance_round()
            self._save()

    def _journal_run_id(self) -> str:
        last, _ = read_tail(self.config.journal_path)
        obj, reason = _chain.parse_line(last) if last else (None, "empty")
        if not isinstance(obj, dict) or not isinstance(obj.get("run_id"), str):
            # fall back to the first line: the genesis names the run
            with open(self.config.journal_path, "rb") as fh:
                first = fh.readline()
            obj, reason = _chain.parse_line(first)
            if not isinstance(obj, dict) or not isinstance(obj.get("run_id"), str):
                raise StateError(f"{self.config.journal_path}: cannot tell which run it holds ({reason})")
        return obj["run_id"]

    def _replay(self) -> dict[str, Any]:
        """Rebuild the state by folding every event of the (strictly checked) journal."""
        state = empty_state()
        count = 0
        prev: str | None = None
        size = 0
        with open(self.config.journal_path, "rb") as fh:
            for count, line in enumerate(fh, 1):
                try:
                    event = _chain.check_line(line, prev, state["run_id"])
                except ValueError as exc:
                    raise StateError(f"cannot rebuild state: {self.config.journal_path} line "
                                     f"{count}: {exc}") from None
                prev = _chain.line_hash(line)
                size += len(line)
                apply_event(state, event)
        state["journal"] = {"events": count, "head": prev, "bytes": size}
        return state

    # -- journal + state -----------------------------------------------------------------
    def _emit(self, event_type: str, message: str = "", **kw: Any) -> None:
        assert self.journal is not None and self.state is not None
        line = self.journal.emit(event_type, message, **kw)
        # Fold what was written (redacted, truncated): replay must give the same state.
        apply_event(self.state, self.journal.last_event)
        head = self.state["journal"]
        head["events"] = self.journal.count
        head["head"] = self.journal.prev_hash
        head["bytes"] = head.get("bytes", 0) + len(line)

    def _save(self) -> None:
        assert self.journal is not None and self.state is not None
        self.journal.sync()
        self.state["round"] = self.state["current_round"]
        self.status_writer.write(self.state)

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

    def _archive(self) -> None:
        """Move a finished run's own files to OUT_DIR/runs/<run_id>/ so a new run starts clean.

        What a run owns is read from its journal (state.json is only a cache): heidi's fixed
        files plus every path inside OUT_DIR that an event recorded in artifact_paths. Anything
        else in OUT_DIR (heidi.toml, scripts/, a user's notes or data) stays where it is."""
        assert self.state is not None
        cfg = self.config
        owned = owned_paths(cfg)  # read before the journal moves
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        dest = os.path.join(cfg.out_dir, "runs", self.state["run_id"])
        os.makedirs(dest, mode=0o700, exist_ok=True)
        # state.json first and the journal last: cut short anywhere, what is left in OUT_DIR is
        # a journal to rebuild the state from, or no run at all (never a state without its journal)
        moved: list[str] = []
        for rel in ["state.json"] + owned + ["events.jsonl"]:
            if any(rel.startswith(done + "/") for done in moved):
                continue  # inside a directory already moved
            src = os.path.join(cfg.out_dir, rel)
            if not os.path.lexists(src):
                continue
            target = os.path.join(dest, rel)
            if os.sep in rel:
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            try:
                os.rename(src, target)  # a file replaces its copy from an archive cut short
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                    continue  # an archive cut short and resumed: the first move won
                if exc.errno != errno.EXDEV:
                    raise
                shutil.move(src, target)  # a path on another filesystem (a symlinked data/)
            moved.append(rel)
        for path, _ in control.pending(cfg.control_dir):
            control.consume(path)  # requests aimed at the finished run
        self.state = None

    # -- ticking -------------------------------------------------------------------------
    def require_run(self) -> dict[str, Any]:
        if self.state is None:
            raise RefusedError(f"no run in {self.config.out_dir}; start one with `heidi start`")
        return self.state

    def apply_requests(self, before_stop: bool = False) -> None:
        """Apply queued control requests in arrival order; refused ones are dropped with a warn.

        before_stop: only those that arrived before the first queued stop (a stop that ended a
        stage is applied after what was asked before it)."""
        for path, action in control.pending(self.config.control_dir):
            if before_stop and action == "stop":
                return
            try:
                self.act(action)
            except RefusedError as exc:
                self._emit("request_refused", f"{action} refused: {exc}", level="warn")
                self._save()
            control.consume(path)

    def tick(self) -> bool:
        """Perform at most one transition; True when something advanced."""
        state = self.require_run()
        self.apply_requests()
        if state["state"] in ("IDLE", "ERROR") or state["paused"]:
            return False
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
                os.makedirs(path, mode=0o700, exist_ok=True)
        ctx = StageContext(config=self.config, run_id=state["run_id"] or "",
                           stop_requested=self.stop_requested,
                           warn=functools.partial(self._stage_warn, stage))
        outcome = self.stage_runner(ctx, stage, round_)
        if outcome.stopped and self.interrupt and not control.stop_pending(self.config.control_dir):
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
            self._emit("stage_end", f"{stage} failed, the loop goes on: {outcome.output_tail[-300:]}",
                       stage=stage, level="warn", usage_delta=outcome.usage_delta,
                       error=outcome.error or f"{stage} failed")
        else:
            self._emit("pipeline_error", f"{stage} failed: {outcome.output_tail[-400:]}",
                       stage=stage, level="error", usage_delta=outcome.usage_delta,
                       error=outcome.error or f"{stage} failed")
        if state["stage_status"] == "done":
            self._advance_round()
        self._save()

    def _stage_warn(self, stage: str, event_type: str, message: str) -> None:
        """StageContext.warn: a warn event about the running stage, durable at once."""
        self._emit(event_type, message, stage=stage, level="warn")
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
        for path, queued in control.pending(self.config.control_dir):
            if queued == action:
                control.consume(path)

    def stop_requested(self) -> bool:
        """A stop waits in the control queue, or a signal came (checked by stage runners several
        times a second): end the running stage."""
        return bool(self.interrupt) or control.stop_pending(self.config.control_dir)

    # -- reading -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return status_view(self.state, self.config)
