"""The result of one supervised stage run, shared by `_supervise_py` and `_supervise_c`.

Defined once so both twins return the very same class (a caller can isinstance-check either).
"""
from __future__ import annotations

import signal as _signal
from dataclasses import dataclass

__all__ = ("StageResult", "make_result")


def _seconds(value: float) -> str:
    # "2.0", "0.25", "7200.0": short, but never "2" (reads like a count, not a duration).
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(frozen=True)
class StageResult:
    """How a stage ended, plus what it cost. Exactly one of spawn_error / signal / exit_code
    describes the end; timed_out and stopped say why heidi ended it.

    cpu_source / memory_source say where the figures come from. "cgroup": the stage's own
    cgroup (cpu.stat, memory.peak), covering every process the stage started. "rusage": the
    rusage of the main process and its reaped descendants; there peak_rss_kb is ru_maxrss, and
    Linux counts in it the address space the process had before exec -- with vfork, the
    supervising process's own resident size: small values are that floor, not the stage's."""

    pid: int | None
    exit_code: int | None
    signal: int | None
    timed_out: bool
    timeout_s: float | None
    stopped: bool
    spawn_error: str | None
    output_bytes: int
    wall_ms: float
    peak_rss_kb: int
    cpu_user_s: float
    cpu_sys_s: float
    cpu_source: str = "rusage"
    memory_source: str = "rusage"

    @property
    def ok(self) -> bool:
        return (self.exit_code == 0 and not self.timed_out and not self.stopped
                and self.spawn_error is None)

    def describe(self) -> str:
        """One short line for a person: why the stage ended."""
        if self.spawn_error is not None:
            return self.spawn_error
        if self.timed_out:
            return f"timed out after {_seconds(self.timeout_s or 0.0)} s"
        if self.stopped:
            return "stopped"
        if self.signal is not None:
            return f"killed by signal {signal_name(self.signal)}"
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}"
        return "ended with unknown status"


_FIELDS = tuple(StageResult.__dataclass_fields__)


def make_result(*values: object) -> StageResult:
    """StageResult(*values) without the frozen dataclass's per-field object.__setattr__ calls
    (a supervisor builds one per stage, right after the stage ends)."""
    result = object.__new__(StageResult)
    result.__dict__.update(zip(_FIELDS, values))
    return result
