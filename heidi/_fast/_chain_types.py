"""What both journal-line twins share: the schema's constants and limits, JournalError, the NaN
probe, and the one code path that turns an event into the bytes of its line.

Defined once so that `_chain_py` and `_chain_c` check the same limits, raise the very same
JournalError class and write byte-identical lines (the compiled twin reads these at import).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import orjson

__all__ = ["KEYS", "EVENT_VERSION", "LEVELS", "MAX_LINE_BYTES", "MAX_MESSAGE_CHARS",
           "MAX_ERROR_CHARS", "MAX_ARTIFACT_CHARS", "MAX_RUN_ID_CHARS", "MAX_NAME_CHARS",
           "READ_CHUNK_BYTES", "JournalError", "nan_literal", "new_event", "event_line",
           "encode_event", "clean_str", "truncate", "numbers", "artifact_list"]

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
_NEWLINE = orjson.OPT_APPEND_NEWLINE  # b"\n" appended by the encoder, not by a copy


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
    return _dumps(event, option=_NEWLINE)


def encode_event(ts: str, run_id: str, round_: int, stage: str, level: str, event_type: str,
                 message: str, counters_delta: dict, usage_delta: dict, artifact_paths: list,
                 error: str | None, prev_hash: str) -> bytes:
    """The exact bytes of one journal line (compact JSON, UTF-8, trailing newline)."""
    return event_line(new_event(ts, run_id, round_, stage, level, event_type, message,
                                counters_delta, usage_delta, artifact_paths, error, prev_hash))


# What an event's fields become before they are written (JournalWriter.emit by way of the twins'
# emit_line): text made valid UTF-8, redacted, cut to the schema's limits; deltas checked.

def clean_str(text: str) -> str:
    """text as valid UTF-8: lone surrogates (from undecodable file names, say) replaced."""
    if text.isascii():
        return text  # the common case, told without encoding a copy
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def numbers(name: str, delta: Mapping[str, Any] | None) -> dict:
    """A counters_delta or usage_delta as written: str keys, finite int or float values."""
    if not delta:
        return {}
    out = {}
    for key, value in delta.items():
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                raise ValueError(f"{name}[{key!r}] must be finite")
        elif kind is not int:
            raise TypeError(f"{name}[{key!r}] must be a number, not {kind.__name__}")
        out[str(key)] = value
    return out


def artifact_list(paths: Iterable[Any], redact: Any) -> list[str]:
    """artifact_paths as written: each redacted, a long one cut from the left (its end names it)."""
    out = []
    for path in paths:
        path = redact(clean_str(str(path)))
        out.append(path if len(path) <= MAX_ARTIFACT_CHARS
                   else "…" + path[-(MAX_ARTIFACT_CHARS - 1):])
    return out
