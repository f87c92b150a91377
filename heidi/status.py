"""state.json: the whole current state of a run, replaced atomically (design.md §3.2)."""
from __future__ import annotations

import os
from typing import Any

import orjson

from ._fast import atomic as _atomic
from .errors import StateError


class StatusWriter:
    """Writes state.json whole (tmp file, fsync, rename, fsync dir); a reader never sees it torn."""

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.path = os.fspath(path)
        self.fsync = fsync

    def write(self, state: dict[str, Any]) -> None:
        data = orjson.dumps(state, option=orjson.OPT_INDENT_2) + b"\n"
        _atomic.atomic_write(self.path, data, 0o600, self.fsync)

    def read(self) -> dict[str, Any] | None:
        return read_state(self.path)


def read_state(path: str) -> dict[str, Any] | None:
    """The state in path, None when there is none; StateError when it is not a JSON object."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        state = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: not a JSON object")
    return state
