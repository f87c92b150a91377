"""Control requests (stop, pause, resume, train-now) from processes that do not hold the run.

A request is a small file in OUT_DIR/control/, named so that sorting gives arrival order; the
process holding the run applies and removes them at its next boundary (a stop also ends a stage).
"""
from __future__ import annotations

import os
import time

from . import loop
from ._fast import atomic as _atomic

ACTIONS = tuple(loop.ACTIONS)  # stop, pause, resume, train_now: where each applies is loop's table


def request(control_dir: str, action: str) -> str:
    """Queue an action for the holder of the run; returns the request file's path."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    os.makedirs(control_dir, mode=0o700, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}-{action}.req"
    path = os.path.join(control_dir, name)
    _atomic.atomic_write(path, action.encode() + b"\n", 0o600, True)
    return path


def pending(control_dir: str) -> list[tuple[str, str]]:
    """(path, action) of every queued request, oldest first."""
    if not os.access(control_dir, os.F_OK):
        return []  # asked every tick: a missing control/ is told without raising (4x dearer)
    try:
        names = os.listdir(control_dir)
    except FileNotFoundError:
        return []
    result = []
    for name in sorted(names):
        if not name.endswith(".req"):
            continue
        action = name[:-4].rsplit("-", 1)[-1]
        if action in ACTIONS:
            result.append((os.path.join(control_dir, name), action))
    return result


def stop_pending(control_dir: str) -> bool:
    """True when a stop request waits: cheap enough to call every quarter second."""
    if not os.access(control_dir, os.F_OK):
        return False  # as in pending(): no exception for the usual case, no control/ at all
    try:
        names = os.listdir(control_dir)
    except FileNotFoundError:
        return False
    return any(name.endswith("-stop.req") for name in names)


def consume(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
