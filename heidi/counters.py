"""Counters a stage reports: heidi hands every stage $HEIDI_COUNTERS_FILE and, after it, reads the
JSON object of numbers found there as the counters_delta of the stage's script_success.

Stages write it with write_counters() (or by hand); anything unusable is a warning, never a crash.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

ENV_NAME = "HEIDI_COUNTERS_FILE"
MAX_KEYS = 32
MAX_BYTES = 64 * 1024
KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z")
MAX_ABS = 1e15  # beyond this a counter is garbage, and floats stop counting exactly


def counters_path(logs_dir: str, round_: int, stage: str) -> str:
    """Where a stage's counters go: beside its log, OUT_DIR/logs/round_R/<stage>.counters.json."""
    return os.path.join(logs_dir, f"round_{round_}", f"{stage}.counters.json")


def prepare(path: str) -> None:
    """Remove what an earlier (interrupted) run of the stage left, so it is never counted twice."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_counters(path: str) -> tuple[dict[str, Any], str | None]:
    """(counters, None), or ({}, why the file was not usable). A missing or empty file is ({}, None)."""
    import orjson
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot read {ENV_NAME} {path}: {exc.strerror}"
    if not data.strip():
        return {}, None
    if len(data) > MAX_BYTES:
        return {}, f"{ENV_NAME} is over {MAX_BYTES // 1024} KiB; ignored"
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}, f"{ENV_NAME} is not valid JSON; ignored"
    problem = check_counters(obj)
    if problem is not None:
        return {}, f"{ENV_NAME}: {problem}; ignored"
    return dict(obj), None


def check_counters(obj: Any) -> str | None:
    """Why obj is not a counters object, or None."""
    if not isinstance(obj, dict):
        return f"must be a JSON object of numbers, not {type(obj).__name__}"
    if len(obj) > MAX_KEYS:
        return f"has {len(obj)} keys, at most {MAX_KEYS} are allowed"
    for key, value in obj.items():
        if not isinstance(key, str) or not KEY_RE.match(key):
            # Never cut a key to show it (a cut secret escapes redaction): whole, or its length.
            shown = repr(key) if isinstance(key, str) and len(key) <= 64 else (
                f"of {len(key)} characters" if isinstance(key, str) else repr(type(key).__name__))
            return (f"key {shown} must be 1-64 characters of A-Z a-z 0-9 _ . : - "
                    "starting with a letter or _")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"value of {key!r} must be a number"
        if not math.isfinite(value) or abs(value) > MAX_ABS:
            return f"value of {key!r} must be a finite number within ±1e15"
    return None


def write_counters(counters: Mapping[str, int | float], path: str | None = None) -> bool:
    """Write counters to `path` (default $HEIDI_COUNTERS_FILE) atomically; False when there is
    nowhere to write (not run as a heidi stage)."""
    import orjson
    target = path or os.environ.get(ENV_NAME)
    if not target:
        return False
    problem = check_counters(dict(counters))
    if problem is not None:
        raise ValueError(f"counters {problem}")
    from ._fast.atomic import atomic_write
    atomic_write(target, orjson.dumps(dict(counters)), 0o600, False)
    return True
