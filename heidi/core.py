"""What the CLI, the daemon and scripts call: ticking, running, control actions, the Core API.

Knows nothing of argv or terminals; the CLI formats what these functions return.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

from . import control
from .config import Config
from .errors import RefusedError, RunLocked, StateError
from .interrupt import Interrupt, signals_interrupt
from .limits import apply_limits
from .lock import lock_holder
from ._fast._supervise_cgroup import running_containment
from .loop import action_reasons, judge_action
from .status import live_view, read_state, status_view
from .waiting import DiskWait, stderr_line

if TYPE_CHECKING:
    from .machine import Machine


def _machine(config: Config, interrupt: Interrupt | None = None) -> "Machine":
    # heidi.machine (the journal, the chain's compiled module) loads only for commands that
    # take the run: `heidi status` reads state.json without it
    from .machine import Machine
    return Machine(config, interrupt=interrupt)


ACTION_DONE = {"stop": "stopped", "pause": "paused", "resume": "resumed", "train_now": "train-now applied",
               "continue": "continuing"}


def tick(config: Config, steps: int = 1, machine: "Machine | None" = None) -> dict[str, Any]:
    """Take the lock and perform up to `steps` transitions; RunLocked if another process holds it.

    machine: one kept from an earlier call (Core does), whose state in memory is reused when
    the run's files did not change in between. SIGTERM, SIGINT or SIGHUP meanwhile end the
    running stage and raise Interrupted: the run is left interrupted, for the next tick to
    continue.
    """
    kept = machine is not None
    if not kept:
        apply_limits(config)  # a kept machine's (Core's) were applied when it was made
    with signals_interrupt(Interrupt()) as interrupt:
        machine = machine or _machine(config, interrupt)
        machine.interrupt = interrupt
        machine.follow_jobs = False  # a tick looks at a running Slurm job once and returns
        machine.open(create=False)
        try:
            machine.require_run()
            for _ in range(steps):
                if not machine.tick():
                    break
            return machine.status()
        except BaseException:
            machine.close()
            raise
        finally:
            if kept:
                machine.release()  # the next call reuses the state and the journal's fd
            else:
                machine.close()


def start(config: Config, mode: str | None = None, machine: "Machine | None" = None) -> dict[str, Any]:
    with (machine or _machine(config)).open() as opened:
        opened.start(mode)
        return opened.status()


def run(config: Config, mode: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll_s: float = 0.5) -> dict[str, Any]:
    """Start a run if there is none (or the last one finished), then tick until IDLE or ERROR.

    While the run is paused it waits for resume or stop, as a foreground loop should. An
    interrupted run goes on in its run_id; with RUN_ID naming a run that already completed (here
    or archived in runs/) nothing happens: the view says so ("already_completed"). A signal ends
    the running stage and raises Interrupted, leaving the run interrupted.
    """
    apply_limits(config)
    done = completed_run(config)
    if done is not None:
        return done
    # Taking the run for a long stay: the whole chain is checked, not only its head.
    with signals_interrupt(Interrupt()) as interrupt, \
            _machine(config, interrupt).open(verify_chain=True) as machine:
        # a long stay: a full disk is waited out (one line on stderr), not the end of the run
        machine.disk_wait = DiskWait(interrupt, stderr_line, machine.clock)
        state = machine.state
        if state is not None and state["status"] == "completed" and state["run_id"] == config.run_id:
            return {**machine.status(), "already_completed": True}  # completed since we looked
        if state is None or state["status"] in ("completed", "stopped"):
            machine.start(mode)
        while True:
            machine.apply_requests()
            view = machine.status()
            if on_progress is not None:
                on_progress(view)
            if view["state"] in ("IDLE", "ERROR") and not view["paused"]:
                return view
            if view["paused"]:
                if interrupt:
                    raise interrupt.error("the paused run was left as it is")
                time.sleep(poll_s)
                continue
            machine.tick()


def completed_run(config: Config) -> dict[str, Any] | None:
    """The status of the completed run named by RUN_ID, in OUT_DIR or archived, else None."""
    if config.run_id is None:
        return None
    state = run_state(config.state_path, config.journal_path)[0]
    if state is not None and state.get("run_id") == config.run_id:
        if state.get("status") != "completed":
            return None
        return {**status(config), "already_completed": True}
    archived = os.path.join(config.out_dir, "runs", config.run_id)
    state = run_state(os.path.join(archived, "state.json"), os.path.join(archived, "events.jsonl"))[0]
    if state is None or state.get("run_id") != config.run_id or state.get("status") != "completed":
        return None
    view = status_view(state, config)
    view.update(already_completed=True, archived=archived, pending_requests=[],
                out_dir=config.out_dir)
    return view


def control_action(config: Config, action: str) -> tuple[str, dict[str, Any]]:
    """Apply stop/pause/resume/train_now now if the run is free, else queue it for its holder.

    Returns ("applied" | "queued", status view). RefusedError when it does not apply.
    """
    try:
        machine = _machine(config).open(create=False)
    except RunLocked:
        state = held_run_state(config)
        view = status_view(state, config)
        if state is None:
            raise RefusedError(f"no run in {config.out_dir}") from None
        judge_action(action, view, queued=view["pending_requests"])
        control.request(config.control_dir, action)
        view = status_view(held_run_state(config), config)
        view["holder_pid"] = lock_holder(config.lock_path)
        return "queued", view
    try:
        machine.require_run()
        machine.apply_requests()
        machine.act(action)
        return "applied", machine.status()
    finally:
        machine.close()


def run_state(state_path: str, journal_path: str, catch_up: bool = True
              ) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The run in a directory, read only: state.json as it is when whole and up to date with the
    journal (the usual case: one read, one stat), else recovery.state_from_journal -- the journal
    replayed. catch_up=False: a whole state.json is taken as it is even when behind (an action
    judged for the holder: a journal changed outside heidi is the holder's to stop on).
    Returns (state, why, note) as state_from_journal does; (state, None, None) otherwise."""
    try:
        state, problem = read_state(state_path), None
    except StateError as exc:
        state, problem = None, str(exc)
    try:
        journal_size = os.stat(journal_path).st_size
    except OSError:
        journal_size = 0
    if not journal_size:
        if problem is not None:
            raise StateError(problem)
        return state, None, None
    if state is not None and (not catch_up or journal_size <= state["journal"]["bytes"]):
        return state, None, None
    from .recovery import state_from_journal
    return state_from_journal(journal_path, state, problem)


def held_run_state(config: Config) -> dict[str, Any] | None:
    """For judging an action queued for the process holding the run: state.json as that process
    last wrote it, or -- missing or damaged -- the journal replayed."""
    return run_state(config.state_path, config.journal_path, catch_up=False)[0]


def status(config: Config) -> dict[str, Any]:
    """The run's state, read without the lock (never torn): state.json, or -- when it is missing,
    damaged or behind -- the journal replayed (`state_note` says so; nothing is written)."""
    state, why, note = run_state(config.state_path, config.journal_path)
    view = status_view(state, config)
    view["holder_pid"] = lock_holder(config.lock_path)
    # behind while a process holds the run: that process is between its append and its write
    view["state_note"] = None if why == "behind" and view["holder_pid"] is not None else note
    view["containment"] = running_containment(view["holder_pid"])
    live_view(view, config)
    view["actions"] = action_reasons(view)
    return view


class Core:
    """The Python API of the walkthrough's binding: one run, driven tick by tick.

    >>> core = heidi.Core(); core.init(); core.start("full"); core.tick(max_steps=10)
    """

    def __init__(self) -> None:
        self.config: Config | None = None
        self._machine: "Machine | None" = None  # kept between ticks: its state is reused

    def _kept(self) -> "Machine":
        cfg = self._cfg()
        if self._machine is None or self._machine.config is not cfg:
            apply_limits(cfg)  # once per configuration, not on every tick
            self._machine = _machine(cfg)
        return self._machine

    def init(self, config_path: str | None = None, **overrides: Any) -> None:
        """Load and validate the configuration (environment over heidi.toml over defaults).

        Keyword overrides use the variable names: Core().init(OUT_DIR="/tmp/x", ROUNDS=2).
        """
        self.config = Config.load(config_path, overrides=overrides or None)
        if self._machine is not None:
            self._machine.close()
        self._machine = None

    def _cfg(self) -> Config:
        if self.config is None:
            self.init()
        assert self.config is not None
        return self.config

    def start(self, mode: str | None = None) -> str:
        """Begin a run in mode ("full" or "collect"; default: HEIDI_MODE, else full)."""
        return _dumps(start(self._cfg(), mode, self._kept()))

    def tick(self, max_steps: int = 1) -> str:
        """Up to max_steps transitions; returns the status as a JSON string."""
        return _dumps(tick(self._cfg(), max_steps, self._kept()))

    def get_status(self) -> dict[str, Any]:
        view = status(self._cfg())
        return view

    def get_status_json(self) -> str:
        return _dumps(self.get_status())

    def action_train_now(self) -> str:
        return control_action(self._cfg(), "train_now")[0]

    def pause(self) -> str:
        return control_action(self._cfg(), "pause")[0]

    def resume(self) -> str:
        return control_action(self._cfg(), "resume")[0]

    def stop(self) -> str:
        return control_action(self._cfg(), "stop")[0]

    def continue_run(self) -> str:
        """A run in ERROR or stopped goes on in its run_id (`heidi continue`)."""
        return control_action(self._cfg(), "continue")[0]

    def shutdown(self) -> None:
        """Release everything; the run stays on disk where it is."""
        self.config = None
        if self._machine is not None:
            self._machine.close()
        self._machine = None


def _dumps(view: dict[str, Any]) -> str:
    global _orjson_dumps
    if _orjson_dumps is None:
        import orjson  # at the first Core call, not at `import heidi`
        _orjson_dumps = orjson.dumps
    return _orjson_dumps(view).decode()


_orjson_dumps: Callable[..., bytes] | None = None
