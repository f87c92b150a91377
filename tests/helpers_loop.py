"""The loop's test helpers, shared by the tests/test_machine_*.py files (and the CLI and
concurrency tests): a mock-mode Config or Core in tmp_path, the event sequences a run must write,
and check_run, the checks a user would run after every scenario."""
from __future__ import annotations

import os

import orjson

import heidi
from heidi.config import Config
from heidi.journal import read_events, verify_journal, verify_run
from heidi.loop import StageContext, StageOutcome
from heidi.machine import Machine, mock_stage
from heidi.status import read_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_STAGES = ("generate", "validate", "train", "eval")
TESTED_STAGES = ("generate", "validate", "test", "train", "eval")
STAGE_EVENTS = ("stage_start", "script_success", "stage_end")
# Settings a developer's shell might export; the tests pin their own.
ENV_SETTINGS = ("RUN_ID", "OUT_DIR", "HEIDI_MODE", "ROUNDS", "RUN_UNIT_TESTS", "HEIDI_CONFIG",
                "HEIDI_MOCK_SUBPROCESSES", "HEIDI_FSYNC", "HEIDI_CLOCK", "HEIDI_REPO_ROOT")


def make_config(tmp_path, **overrides) -> Config:
    values = {"OUT_DIR": str(tmp_path / "out"), "ROUNDS": 2, "HEIDI_MOCK_SUBPROCESSES": True,
              "HEIDI_FSYNC": False}
    values.update(overrides)
    return Config.load(None, environ={}, overrides=values)


def make_core(tmp_path, **overrides) -> heidi.Core:
    values = {"OUT_DIR": str(tmp_path / "out"), "ROUNDS": 2, "HEIDI_MOCK_SUBPROCESSES": 1,
              "HEIDI_FSYNC": 0}
    values.update(overrides)
    core = heidi.Core()
    core.init(None, **values)
    return core


def events(cfg: Config, path: str | None = None) -> list[dict]:
    return list(read_events(path or cfg.journal_path))


def types(cfg: Config) -> list[str]:
    return [e["event_type"] for e in events(cfg)]


def stage_block(stages) -> list[str]:
    return [kind for _ in stages for kind in STAGE_EVENTS]


def expected_full(rounds: int, stages=FULL_STAGES) -> list[str]:
    seq = ["pipeline_start"]
    for _ in range(rounds):
        seq.append("round_start")
        seq += stage_block(stages)
    seq.append("pipeline_complete")
    return seq


def expected_collect(rounds: int, tests: bool = False) -> list[str]:
    seq = ["pipeline_start"]
    before = ("generate", "validate", "test") if tests else ("generate", "validate")
    for _ in range(rounds):
        seq.append("round_start")
        seq += stage_block(before)
        seq.append("train_now")
        seq += stage_block(("train", "eval"))
    seq.append("pipeline_complete")
    return seq


def check_run(cfg: Config) -> dict:
    """`heidi verify` passes, and state.json is exactly the journal replayed."""
    count, head, run_id = verify_run(cfg)
    assert verify_journal(cfg.journal_path) == (count, head, run_id)
    state = read_state(cfg.state_path)
    assert state is not None
    assert state["journal"]["events"] == count and state["journal"]["head"] == head
    assert state["journal"]["bytes"] == os.path.getsize(cfg.journal_path)
    assert state["run_id"] == run_id
    replayed = Machine(cfg, stage_runner=mock_stage)._replay()
    on_disk = {k: v for k, v in state.items() if k not in ("round", "pending_requests")}
    assert on_disk == replayed
    assert state["round"] == state["current_round"]
    assert oct(os.stat(cfg.state_path).st_mode & 0o777) == oct(0o600)
    assert oct(os.stat(cfg.journal_path).st_mode & 0o777) == oct(0o600)
    return state


def status(core: heidi.Core) -> dict:
    return core.get_status()


def ticks_until_done(core: heidi.Core, limit: int = 10_000) -> int:
    """Tick one transition at a time until nothing moves; returns the number of ticks that moved."""
    cfg = core.config
    for moved in range(limit):
        before = read_state(cfg.state_path)["journal"]["events"]
        view = orjson.loads(core.tick())
        after = read_state(cfg.state_path)["journal"]["events"]
        if after == before:
            return moved
        assert view["state"] != "ERROR"
    raise AssertionError("the run never settled")


def fail_on(stage_name: str, error: str = "exited with code 3",
            tail: str = "Traceback (most recent call last):\nValueError: bad sample\n"):
    def runner(ctx: StageContext, stage: str, round_: int) -> StageOutcome:
        if stage == stage_name:
            return StageOutcome(ok=False, error=error, output_tail=tail,
                                usage_delta={"memory_mb_delta": 2.0, "cpu_pct": 50.0,
                                             "system_mem_available_kb_delta": -10,
                                             "system_cpu_pct": 20.0})
        return mock_stage(ctx, stage, round_)
    return runner
