"""What both journal-line twins share: the schema's constants and limits, JournalError, the NaN
probe, and the one code path that turns an event into the bytes of its line.

Defined once so that `_chain_py` and `_chain_c` check the same limits, raise the very same
JournalError class and write byte-identical lines (the compiled twin reads these at import).
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = ["KEYS", "EVENT_VERSION", "LEVELS", "MAX_LINE_BYTES", "MAX_MESSAGE_CHARS",
           "MAX_ERROR_CHARS", "MAX_ARTIFACT_CHARS", "MAX_RUN_ID_CHARS", "MAX_NAME_CHARS",
           "READ_CHUNK_BYTES", "JournalError", "nan_literal", "new_event", "event_line",
           "encode_event"]

KEYS = ("event_version", "ts", "run_id", "round", "stage", "level", "event_type", "message",
        "counters_delta", "usage_delta", "artifact_paths", "error", "prev_hash")
EVENT_VERSION = "1.0"
LEVELS = frozenset(("info", "warn", "error", "success", "critical"))
MAX_LINE_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 500
MAX_ERROR_CHARS = 200
MAX_ARTIFACT_CHARS = 100
MAX_RUN_ID_CHARS = 128
MAX_NAME_CHARS = 64  # stage and event_type
READ_CHUNK_BYTES = 1 << 20


class JournalError(ValueError):
    """A journal line that breaks the schema or the chain; str() is 'line N: reason'."""

    def __init__(self, line_no: int, reason: str) -> None:
        super().__init__(f"line {line_no}: {reason}")
        self.line_no = line_no
        self.reason = reason


class _Constant(Exception):
    pass


def _raise_constant(name: str) -> None:
    raise _Constant(name)


def nan_literal(line: bytes) -> bool:
    """True when the line is JSON but for a NaN/Infinity literal (asked on the error path only)."""
    import json  # the error path only
    try:
        json.loads(line, parse_constant=_raise_constant)
    except _Constant:
        return True
    except ValueError:
        return False
    return False


_dumps = orjson.dumps


def new_event(ts: str, run_id: str, round_: int, stage: str, level: str, event_type: str,
              message: str, counters_delta: dict, usage_delta: dict, artifact_paths: list,
              error: str | None, prev_hash: str) -> dict[str, Any]:
    """One event as a dict whose keys are KEYS in order (what event_line encodes)."""
    return {
        "event_version": EVENT_VERSION, "ts": ts, "run_id": run_id, "round": round_,
        "stage": stage, "level": level, "event_type": event_type, "message": message,
        "counters_delta": counters_delta, "usage_delta": usage_delta,
        "artifact_paths": artifact_paths, "error": error, "prev_hash": prev_hash,
    }


def event_line(event: dict[str, Any]) -> bytes:
    """The exact bytes of an event's journal line: compact JSON, UTF-8, trailing newline.

    The only place a line is encoded (JournalWriter.emit and encode_event both come here), so
    what is written and what verify calls canonical cannot part.
    """
    return _dumps(event) + b"\n"


def encode_event(ts: str, run_id: str, round_: int, stage: str, level: str, event_type: str,
                 message: str, counters_delta: dict, usage_delta: dict, artifact_paths: list,
                 error: str | None, prev_hash: str) -> bytes:
    """The exact bytes of one journal line (compact JSON, UTF-8, trailing newline)."""
    return event_line(new_event(ts, run_id, round_, stage, level, event_type, message,
                                counters_delta, usage_delta, artifact_paths, error, prev_hash))
