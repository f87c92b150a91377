"""The daemon's pid file and daemon.json: written whole, removed only while they still name this
process (a newer daemon's files are never taken away)."""
from __future__ import annotations

import os

import orjson

from .._fast import atomic as _atomic


def write_file(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    _atomic.atomic_write(path, data, 0o600, True)


def remove_if_ours(path: str | None, pid: int) -> None:
    """Remove a pid file / daemon.json only while it still names this process."""
    if not path:
        return
    try:
        with open(path, "rb") as fh:
            data = fh.read(4096)
    except OSError:
        return
    first = data.split(b"\n", 1)[0].strip()
    if first == str(pid).encode() or (path.endswith(".json") and _json_pid(data) == pid):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _json_pid(data: bytes) -> int | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj.get("pid") if isinstance(obj, dict) else None
