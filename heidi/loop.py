"""The loop itself, pure (design.md §4): its states, the transition table, what a stage's run
produced, and how one event folds into the state. No I/O: the machine decides and journals, this
module only says what follows what, so replaying a journal through `apply_event` rebuilds a state.
"""
from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import RefusedError, StateError

if TYPE_CHECKING:
    from .config import Config

STATES = ("IDLE", "COLLECTING", "VALIDATING", "TESTING", "FINALIZING", "EVALUATING", "ERROR")
STAGE_OF = {"COLLECTING": "generate", "VALIDATING": "validate", "TESTING": "test",
            "FINALIZING": "train", "EVALUATING": "eval"}
STATE_OF = {stage: state for state, stage in STAGE_OF.items()}
NEXT_ROUND = "NEXT_ROUND"  # COLLECTING of the next round, or IDLE (completed) after the last

# The loop, one row per (state, outcome of its stage) -> next state in (full, collect) mode.
# A tick in a stage state runs that stage; "ok+tests" is a success with RUN_UNIT_TESTS=1.
# Any other failing stage is fail-closed: pipeline_error, ERROR.
TRANSITIONS: dict[tuple[str, str], tuple[str, str]] = {
    # (state,        outcome)      full           collect
    ("COLLECTING", "ok"):       ("VALIDATING", "VALIDATING"),
    ("VALIDATING", "ok"):       ("FINALIZING", "IDLE"),      # collect: wait for train-now
    ("VALIDATING", "ok+tests"): ("TESTING",    "TESTING"),
    ("TESTING",    "ok"):       ("FINALIZING", "IDLE"),      # collect: wait for train-now
    ("FINALIZING", "ok"):       ("EVALUATING", "EVALUATING"),
    ("EVALUATING", "ok"):       (NEXT_ROUND,   NEXT_ROUND),
    ("EVALUATING", "failed"):   (NEXT_ROUND,   NEXT_ROUND),  # a failed eval is a warn only
    ("COLLECTING", "failed"):   ("ERROR",      "ERROR"),
    ("VALIDATING", "failed"):   ("ERROR",      "ERROR"),
    ("TESTING",    "failed"):   ("ERROR",      "ERROR"),
    ("FINALIZING", "failed"):   ("ERROR",      "ERROR"),
}
ACTIVE_STATUSES = ("running", "idle", "paused")  # a run that is not over
ENDED_STATUSES = ("error", "stopped")  # a run that ended early: `continue` takes it up again


@dataclass(frozen=True)
class ActionRule:
    applies: tuple[str, ...]   # statuses in which the holder of the run applies it
    noop: tuple[str, ...]      # statuses in which it is already in effect: nothing happens
    queued: tuple[str, ...]    # statuses in which another process may queue it for the holder
    refused: str               # the one line when it does not apply
    mode: str | None = None    # and the run must be in this mode ...
    state: str | None = None   # ... and this state
    behind: str | None = None  # also queued, whatever the status, behind this queued action


# Control actions, one row each, by the run's status. A request queued while another process
# holds the run is judged from the last written state.json; the holder judges it again when it
# applies it (a refusal then is a request_refused warn in the journal).
ACTIONS: dict[str, ActionRule] = {
    #                      applies in              no-op in            queued while
    "stop":      ActionRule(ACTIVE_STATUSES,        (),                 ACTIVE_STATUSES,
                            "run {run_id} is {status}; nothing to stop"),
    "pause":     ActionRule(("running", "idle"),    ("paused",),        ACTIVE_STATUSES,
                            "run {run_id} is {status}; only a running or idle run can pause"),
    "resume":    ActionRule(("paused",),            ("running", "idle"), ("paused",),
                            "run {run_id} is {status}, not paused", behind="pause"),
    "train_now": ActionRule(("idle", "paused"),     (),                 ACTIVE_STATUSES,
                            "train-now applies in collect mode waiting in IDLE; run {run_id} is "
                            "in {mode} mode, state {state}, status {status}",
                            mode="collect", state="IDLE"),
    "continue":  ActionRule(ENDED_STATUSES,         (),                 ENDED_STATUSES,
                            "run {run_id} is {status}; only a run in ERROR or stopped can continue "
                            "(an interrupted run goes on by itself with the next tick, `heidi run` "
                            "or daemon)"),
}


def judge_action(action: str, state: Mapping[str, Any], queued: Sequence[str] | None = None) -> bool:
    """Whether `action` applies to a run in `state` (its state or status view): True to apply it,
    False when it is already in effect; RefusedError (the row's line) when it does not apply.

    queued: the requests already waiting, when judging one to queue for the holder of the run
    (None: the caller holds the run and applies it now).
    """
    rule = ACTIONS.get(action)
    if rule is None:
        raise ValueError(f"unknown action {action!r}")
    status = state["status"]
    if queued is None:
        if status in rule.noop:
            return False
        ok = status in rule.applies
    else:
        ok = status in rule.queued or (rule.behind is not None and rule.behind in queued)
    if ok and rule.mode is not None and state["mode"] != rule.mode:
        ok = False
    if ok and rule.state is not None and state["state"] != rule.state:
        ok = False
    if not ok:
        raise RefusedError(rule.refused.format(run_id=state["run_id"], status=status,
                                               mode=state["mode"], state=state["state"]))
    return True


def action_reasons(view: Mapping[str, Any]) -> dict[str, str | None]:
    """For each control action, None when it applies to the run in `view` (a status view) now,
    else the one line saying why not: what the page shows on a disabled button.

    Judged as the holder of the run would apply it, and also as a request queued behind those
    pending (a resume behind a queued pause is accepted). An interrupted run is judged by the
    status on disk: the next process that takes it applies the action."""
    if view.get("run_id") is None:
        return {action: f"no run in {view.get('out_dir')}" for action in ACTIONS}
    judged = dict(view)
    if view.get("interrupted"):
        judged["status"] = "running"
    pending = list(view.get("pending_requests") or ())
    reasons: dict[str, str | None] = {}
    for action in ACTIONS:
        if pending and pending[-1] == action:
            reasons[action] = f"{action.replace('_', '-')} is already requested; the process " \
                              "holding the run applies it at its next step"
            continue
        try:
            applies = judge_action(action, judged)
            reasons[action] = None if applies else \
                f"run {view['run_id']} is {judged['status']} already: nothing to {action}"
        except RefusedError as exc:
            reasons[action] = str(exc)
        if reasons[action] is not None and pending:
            try:
                judge_action(action, judged, queued=pending)
                reasons[action] = None
            except RefusedError:
                pass
    return reasons


def next_state(state: str, outcome: str, mode: str, run_unit_tests: bool) -> str:
    if outcome == "ok" and state == "VALIDATING" and run_unit_tests:
        outcome = "ok+tests"
    full, collect = TRANSITIONS[(state, outcome)]
    return collect if mode == "collect" else full


@dataclass
class StageOutcome:
    """What running one stage produced."""

    ok: bool
    usage_delta: dict[str, float] = field(default_factory=dict)
    counters_delta: dict[str, int] = field(default_factory=dict)
    artifact_paths: list[str] = field(default_factory=list)
    error: str | None = None          # one line: "exited with code 3", "timed out after 60 s"
    output_tail: str = ""             # redacted tail of the stage's output
    stopped: bool = False             # ended because a stop was requested


@dataclass(frozen=True)
class StageContext:
    """What a stage runner gets from the machine, and no more."""

    config: "Config"
    run_id: str
    stop_requested: Callable[[], bool]  # a stop waits: end the stage (cheap; poll it often)
    warn: Callable[[str, str], None]    # warn(event_type, message): journal it now, durably


# A stage runner: (context, stage, round) -> what running the stage produced. Never raises for
# the stage's own failure.
StageRunner = Callable[[StageContext, str, int], StageOutcome]


def new_run_id(now_s: float) -> str:
    return time.strftime("run_%Y%m%d_%H%M%S_", time.gmtime(now_s)) + secrets.token_hex(4)


_START_RE = re.compile(r"mode=(full|collect), rounds=(\d+), run_unit_tests=([01])")
# A Slurm stage in the journal (README "Stages on Slurm"): stage_start "Starting S as Slurm job
# NAME" (the attempt, before sbatch), slurm_submitted "... Slurm job ID (NAME)", slurm_job_state
# "Slurm job ID is STATE". Folded into state["slurm_job"] until the stage's end is journaled.
_SLURM_NAME_RE = re.compile(r"as Slurm job (heidi-[A-Za-z0-9._-]+)")
_SLURM_ID_RE = re.compile(r"Slurm job (\d+) \((heidi-[A-Za-z0-9._-]+)\)")
_SLURM_STATE_RE = re.compile(r"Slurm job (\d+) is ([A-Z_]+)")
_SLURM_ENDS = ("script_success", "stage_end", "pipeline_error", "pipeline_stop")


def empty_state() -> dict[str, Any]:
    return {
        "run_id": None, "status": "idle", "state": "IDLE", "mode": "full", "current_round": 0,
        "rounds": 0, "run_unit_tests": False, "current_stage": None, "stage_status": None,
        "paused": False, "stop_requested": False, "pause_requested": False,
        "counters": {}, "usage": {}, "usage_by_stage": {}, "started_at": None,
        "stage_started_at": None, "updated_at": None,
        "journal": {"events": 0, "head": None, "bytes": 0}, "last_error": None,
        "continue_from": None,
    }


# Keys a state.json written before usage_by_stage and stage_started_at existed lacks; such a
# state is rebuilt from the journal when a process takes the run (its usage was summed whole).
NEW_STATE_KEYS = ("usage_by_stage", "stage_started_at")


_STATUSES = ("idle", "running", "paused", "completed", "stopped", "error")
_STAGE_STATUSES = (None, "pending", "running", "succeeded", "done")


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _text(value: Any) -> bool:
    return value is None or type(value) is str


def _numbers(value: Any) -> bool:
    return type(value) is dict and all(type(v) in (int, float) for v in value.values())


def _in(choices: Sequence[Any]) -> Callable[[Any], bool]:
    return lambda value: (value is None or type(value) is str) and value in choices


def _journal_head(value: Any) -> bool:
    return (type(value) is dict and _count(value.get("events")) and _count(value.get("bytes"))
            and _text(value.get("head")) and type(value.get("head_offset", 0)) is int
            and type(value.get("mtime_ns", 0)) is int)


def _point(value: Any) -> bool:
    return value is None or (type(value) is dict and value.get("state") in STATES
                             and _in(_STAGE_STATUSES)(value.get("stage_status")))


def _slurm_job(value: Any) -> bool:
    return value is None or (type(value) is dict and type(value.get("name")) is str
                             and _text(value.get("id")) and _text(value.get("state")))


# What heidi does with a state read from disk, key by key: a state.json that fails one of these
# was not written by heidi (or was damaged) and is never acted on (see state_problem).
_STATE_SHAPE: tuple[tuple[str, bool, Callable[[Any], bool], str], ...] = (
    # key, required, check, what it must be
    ("run_id", True, lambda v: type(v) is str and v != "", "a run id"),
    ("status", True, _in(_STATUSES), "one of " + ", ".join(_STATUSES)),
    ("state", True, _in(STATES), "one of " + ", ".join(STATES)),
    ("mode", True, _in(("full", "collect")), "full or collect"),
    ("current_round", True, _count, "a whole number"),
    ("rounds", True, _count, "a whole number"),
    ("run_unit_tests", True, lambda v: type(v) is bool, "true or false"),
    ("paused", True, lambda v: type(v) is bool, "true or false"),
    ("stop_requested", True, lambda v: type(v) is bool, "true or false"),
    ("pause_requested", True, lambda v: type(v) is bool, "true or false"),
    ("current_stage", True, _in((None,) + tuple(STATE_OF)), "null or a stage"),
    ("stage_status", True, _in(_STAGE_STATUSES), "null or a stage status"),
    ("counters", True, _numbers, "an object of numbers"),
    ("usage", True, _numbers, "an object of numbers"),
    ("usage_by_stage", False, lambda v: type(v) is dict and all(type(x) is dict for x in v.values()),
     "an object of objects"),
    ("started_at", True, _text, "null or a time"),
    ("stage_started_at", False, _text, "null or a time"),
    ("updated_at", True, _text, "null or a time"),
    ("last_error", True, _text, "null or a line"),
    ("journal", True, _journal_head, "the journal's head (events, head, bytes)"),
    ("continue_from", False, _point, "null or a state and stage status"),
    ("slurm_job", False, _slurm_job, "null or a Slurm job"),
    ("slurm_attempts", False, _count, "a whole number"),
)


def state_problem(state: Mapping[str, Any]) -> str | None:
    """Why a state read from disk is not one heidi wrote -- a key missing, or of a kind heidi
    never writes there -- else None. Deep enough that nothing heidi does with an accepted state
    fails on it; what a key says (a state other than the journal's) is `heidi verify`'s to judge."""
    for key, required, check, what in _STATE_SHAPE:
        if key not in state:
            if required:
                return f"no {key!r}"
            continue
        if not check(state[key]):
            value = repr(state[key])
            return f"{key!r} is {value if len(value) <= 40 else value[:37] + '...'}, not {what}"
    return None


def usage_rule(key: str) -> str:
    """How a usage_delta key folds into the run's usage, by its name: amounts (`*_s`, `*_ms`,
    `*_bytes`) "sum" over stages, peaks (`peak_*`) keep their "max", and anything else (a
    percentage, a delta of a system reading) is only meaningful per stage: "last", kept in
    usage_by_stage[stage] beside every other key of the stage's last delta."""
    if key.startswith("peak_"):
        return "max"
    if key.endswith(("_s", "_ms", "_bytes")):
        return "sum"
    return "last"


_RULES: dict[str, str] = {}  # usage_rule by key, for the few keys stages report (folded each tick)


def _fold_usage(state: dict[str, Any], stage: str | None, delta: dict[str, Any]) -> None:
    total = state["usage"]
    rules = _RULES
    for key, value in delta.items():
        rule = rules.get(key)
        if rule is None:
            rule = usage_rule(key)
            if len(rules) < 256:
                rules[key] = rule
        if rule == "sum":
            old = total.get(key, 0)
            total[key] = round(old + value, 6) if isinstance(value, float) or isinstance(old, float) \
                else old + value
        elif rule == "max":
            total[key] = max(total.get(key, value), value)
    state.setdefault("usage_by_stage", {})[stage or "pipeline"] = dict(delta)


def _add(total: dict, delta: dict) -> None:
    for key, value in delta.items():
        summed = total.get(key, 0) + value
        total[key] = round(summed, 6) if isinstance(value, float) else summed


def _continue_point(state: dict[str, Any]) -> dict[str, Any]:
    """Where `continue` takes a run up again: the state and stage status it ended in."""
    return {"state": state["state"], "stage_status": state["stage_status"]}


def apply_event(state: dict[str, Any], event: dict[str, Any]) -> None:
    """Fold one event into the state. Pure bookkeeping; the decisions live in the machine."""
    kind = event["event_type"]
    state["updated_at"] = event["ts"]
    if kind in _SLURM_ENDS and state.get("slurm_job"):
        state["slurm_job"] = None  # the stage's end is journaled: no job to follow any more
    if event["counters_delta"]:
        _add(state["counters"], event["counters_delta"])
    if event["usage_delta"]:
        _fold_usage(state, event.get("stage"), event["usage_delta"])
    if kind == "pipeline_start":
        state["continue_from"] = None
        match = _START_RE.search(event["message"])
        if match is None:
            raise StateError("pipeline_start event does not record mode, rounds and run_unit_tests")
        state.update(run_id=event["run_id"], status="running", state="IDLE", current_round=0,
                     mode=match.group(1), rounds=int(match.group(2)),
                     run_unit_tests=match.group(3) == "1", started_at=event["ts"],
                     current_stage=None, stage_status=None, last_error=None)
    elif kind == "round_start":
        state.update(current_round=event["round"], state="COLLECTING", stage_status="pending",
                     current_stage="generate")
        if not state["paused"]:
            state["status"] = "running"
    elif kind == "stage_start":
        state.update(current_stage=event["stage"], state=STATE_OF[event["stage"]],
                     stage_status="running", stage_started_at=event["ts"])
        match = (_SLURM_NAME_RE.search(event["message"]) if "as Slurm job" in event["message"]
                 else None)
        if match is not None:
            state["slurm_attempts"] = state.get("slurm_attempts", 0) + 1
            state["slurm_job"] = {"name": match.group(1), "id": None, "state": None,
                                  "stage": event["stage"], "round": event["round"]}
    elif kind in ("slurm_submitted", "slurm_job_state"):
        _fold_slurm(state, event["message"])
    elif kind == "stage_interrupted":
        state["stage_status"] = "pending"
    elif kind == "script_success":
        # The stage's work is done: a crash before stage_end must not run it again.
        state["stage_status"] = "succeeded"
    elif kind == "stage_end":
        stage_state = STATE_OF[event["stage"]]
        outcome = "failed" if event["level"] == "warn" else "ok"
        nxt = next_state(stage_state, outcome, state["mode"], state["run_unit_tests"])
        if nxt == NEXT_ROUND:
            state["stage_status"] = "done"  # round_start or pipeline_complete follows
        else:
            state.update(state=nxt, stage_status="pending" if nxt != "IDLE" else None,
                         current_stage=STAGE_OF.get(nxt))
            if nxt == "IDLE" and not state["paused"]:
                state["status"] = "idle"  # collect mode: waiting for train-now
    elif kind == "pipeline_error":
        state["continue_from"] = _continue_point(state)
        state.update(state="ERROR", status="error", stage_status=None, last_error=event["error"],
                     paused=False, pause_requested=False)
    elif kind == "pipeline_stop":
        state["continue_from"] = _continue_point(state)
        state.update(state="IDLE", status="stopped", stage_status=None, stop_requested=False,
                     paused=False, pause_requested=False)
    elif kind == "pipeline_continue":
        point = state.get("continue_from") or {"state": "IDLE", "stage_status": None}
        stage_status = point["stage_status"]
        if stage_status == "running":
            stage_status = "pending"  # the stage was ended (failed or stopped): it runs again
        state.update(state=point["state"], stage_status=stage_status, continue_from=None,
                     current_stage=STAGE_OF.get(point["state"], state["current_stage"]),
                     status="running" if point["state"] in STAGE_OF else "idle",
                     paused=False, pause_requested=False, stop_requested=False)
    elif kind == "pipeline_complete":
        state.update(state="IDLE", status="completed", stage_status=None, current_stage=None,
                     paused=False, pause_requested=False)
    elif kind == "pipeline_pause":
        state.update(paused=True, pause_requested=False, status="paused")
    elif kind == "pipeline_resume":
        state["paused"] = False
        state["status"] = "idle" if state["state"] == "IDLE" else "running"
    elif kind == "train_now":
        state.update(state="FINALIZING", stage_status="pending", current_stage="train")
        if not state["paused"]:
            state["status"] = "running"


def _fold_slurm(state: dict[str, Any], message: str) -> None:
    job = state.get("slurm_job")
    if not job:
        return
    match = _SLURM_ID_RE.search(message)
    if match is not None and match.group(2) == job["name"]:
        state["slurm_job"] = {**job, "id": match.group(1), "state": "PENDING"}
        return
    match = _SLURM_STATE_RE.search(message)
    if match is not None and match.group(1) == job["id"]:
        state["slurm_job"] = {**job, "state": match.group(2)}
