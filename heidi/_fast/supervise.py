"""Stage supervision: the compiled `_supervise_c` unless it is absent or HEIDI_NO_EXTENSIONS is set.

run_supervised(argv, *, cwd, env, timeout_s, grace_s, on_output, should_stop, check_interval_s,
rlimits) -> StageResult. The stage runs in its own session (stdin /dev/null, stdout+stderr merged
into on_output, only fds 0-2, env as given plus HEIDI_STAGE_TOKEN); timeout or should_stop() ->
SIGTERM to all of its processes, SIGKILL grace_s later; it never outlives heidi, even a SIGKILLed
heidi (see `_supervise_watchdog`): the calling process becomes a child subreaper and keeps a
watchdog process; where it can create cgroup v2 children, each stage runs in its own, killed
whole at its end (see `_supervise_cgroup`; containment() says which is in use). A command that
cannot start gives result.spawn_error; an exception from a callback terminates the stage, then
propagates. Which processes count as a stage's:
`_supervise_core`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import no_extensions

__all__ = ("COMPILED", "StageResult", "containment", "ensure_watchdog", "run_supervised",
           "running_containment", "watchdog_pid")

if TYPE_CHECKING:
    from ._supervise_py import StageResult, run_supervised
    COMPILED = False
else:
    try:
        if no_extensions():
            raise ImportError("HEIDI_NO_EXTENSIONS is set")
        from ._supervise_c import StageResult, run_supervised
        COMPILED = True
    except ImportError:
        from ._supervise_py import StageResult, run_supervised
        COMPILED = False

from ._supervise_cgroup import containment, running_containment
from ._supervise_watchdog import ensure_started as ensure_watchdog
from ._supervise_watchdog import watchdog_pid
