"""Journal lines, pure-Python twin: build a schema-v1.0 line, hash it, and check lines strictly.

Same API as the compiled `_chain_c`; `heidi/_fast/chain.py` picks one.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, BinaryIO, Callable, Iterable, Mapping

import orjson

__all__ = ["KEYS", "EVENT_VERSION", "LEVELS", "MAX_LINE_BYTES", "MAX_MESSAGE_CHARS",
           "MAX_ERROR_CHARS", "MAX_ARTIFACT_CHARS", "MAX_RUN_ID_CHARS", "MAX_NAME_CHARS",
           "JournalError", "line_hash", "emit_line", "new_event", "event_line", "encode_event", "check_event",
           "parse_line", "check_line", "verify_stream"]

# Limits and the line encoder are _chain_types', shared with the compiled twin.
from ._chain_types import (EVENT_VERSION, KEYS, LEVELS, MAX_ARTIFACT_CHARS, MAX_ERROR_CHARS,
                           MAX_LINE_BYTES, MAX_MESSAGE_CHARS, MAX_NAME_CHARS, MAX_RUN_ID_CHARS,
                           READ_CHUNK_BYTES, JournalError, artifact_list, clean_str, encode_event,
                           event_line, nan_literal, numbers, truncate,
                           new_event)

_TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z\Z")
_RUN_ID_RE = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_RUN_ID_CHARS}}}\Z")
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_NAME_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME_CHARS}}}\Z")


def line_hash(line: bytes) -> str:
    """Lowercase hex SHA-256 of a whole journal line, its newline included."""
    return hashlib.sha256(line).hexdigest()


def emit_line(ts: str, run_id: str, round_: int, stage: str, level: str, event_type: str,
              message: str, counters_delta: Mapping[str, Any] | None,
              usage_delta: Mapping[str, Any] | None, artifact_paths: Iterable[Any] | None,
              error: Any, prev_hash: str,
              redact: Callable[[str], str]) -> tuple[dict[str, Any], bytes, str]:
    """A new event as JournalWriter.emit writes it: (the event, its line, the line's hash).

    message, error and artifact paths are made valid UTF-8, redacted and cut to the schema's
    limits; the deltas are checked (finite numbers); level must be one of LEVELS."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: must be one of {', '.join(sorted(LEVELS))}")
    message = redact(message if message.isascii() else clean_str(message))
    if len(message) > MAX_MESSAGE_CHARS:
        message = truncate(message, MAX_MESSAGE_CHARS)
    if error is not None:
        error = truncate(redact(clean_str(str(error))), MAX_ERROR_CHARS)
    event = new_event(ts, run_id, round_, stage, level, event_type, message,
                      numbers("counters_delta", counters_delta),
                      numbers("usage_delta", usage_delta),
                      artifact_list(artifact_paths, redact) if artifact_paths else [], error,
                      prev_hash)
    line = event_line(event)
    return event, line, hashlib.sha256(line).hexdigest()


def _is_number(value: object) -> bool:
    return type(value) is int or type(value) is float


def check_event(obj: object, expected_prev: str | None, run_id: str | None) -> str | None:
    """Reason why a parsed line is not a valid v1.0 event, or None when it is.

    expected_prev None means "first event": prev_hash must equal the event's own run_id.
    run_id, when given, is the run every event must belong to.
    """
    if type(obj) is not dict:
        return "not a JSON object"
    keys = tuple(obj)
    if keys != KEYS:
        for key in keys:
            if key not in KEYS:
                return f"unknown key {key!r}"
        for key in KEYS:
            if key not in obj:
                return f"missing key {key!r}"
        return "keys out of order"
    if obj["event_version"] != EVENT_VERSION:
        return f"event_version {obj['event_version']!r}, expected {EVENT_VERSION!r}"
    ts = obj["ts"]
    if type(ts) is not str or not _TS_RE.match(ts):
        return "ts is not a UTC timestamp like 2026-02-20T07:45:38.307Z"
    rid = obj["run_id"]
    if type(rid) is not str or not _RUN_ID_RE.match(rid):
        return f"run_id is not 1-{MAX_RUN_ID_CHARS} characters of [A-Za-z0-9._-]"
    if run_id is not None and rid != run_id:
        return f"run_id {rid!r} differs from the journal's run {run_id!r}"
    rnd = obj["round"]
    if type(rnd) is not int or rnd < 0:
        return "round is not a non-negative integer"
    for key in ("stage", "event_type"):
        value = obj[key]
        if type(value) is not str or not _NAME_RE.match(value):
            return f"{key} is not a name of 1-{MAX_NAME_CHARS} characters [A-Za-z0-9_.-]"
    if obj["level"] not in LEVELS:
        return "level is not one of info, warn, error, success, critical"
    msg = obj["message"]
    if type(msg) is not str or len(msg) > MAX_MESSAGE_CHARS:
        return f"message is not a string of at most {MAX_MESSAGE_CHARS} characters"
    for key in ("counters_delta", "usage_delta"):
        delta = obj[key]
        if type(delta) is not dict:
            return f"{key} is not an object"
        for value in delta.values():
            if not _is_number(value):
                return f"{key} has a value that is not a number"
    paths = obj["artifact_paths"]
    if type(paths) is not list:
        return "artifact_paths is not an array"
    for path in paths:
        if type(path) is not str or len(path) > MAX_ARTIFACT_CHARS:
            return ("artifact_paths has an entry that is not a string of at most "
                    f"{MAX_ARTIFACT_CHARS} characters")
    err = obj["error"]
    if err is not None and (type(err) is not str or len(err) > MAX_ERROR_CHARS):
        return f"error is not null or a string of at most {MAX_ERROR_CHARS} characters"
    prev = obj["prev_hash"]
    if type(prev) is not str:
        return "prev_hash is not a string"
    if expected_prev is None:
        if prev != rid:
            return "first event's prev_hash is not its run_id (wrong genesis)"
    elif prev != expected_prev:
        if not _HEX64_RE.match(prev):
            return "prev_hash is not a lowercase hex SHA-256"
        return ("prev_hash does not match the previous line (chain broken: that line was changed, "
                "or lines were deleted, swapped or inserted before this one)")
    return None


def parse_line(line: bytes) -> tuple[Any, str | None]:
    """(parsed object, None) or (None, reason) for one line including its newline (Any: a JSON
    value, a dict once check_event accepted it)."""
    if len(line) > MAX_LINE_BYTES:
        return None, f"line longer than {MAX_LINE_BYTES} bytes"
    if not line.endswith(b"\n"):
        return None, "last line is cut off (no newline)"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "UTF-8" in text or "utf-8" in text or "surrogate" in text:
            return None, "invalid UTF-8"
        if nan_literal(line):
            return None, "NaN/Infinity is not valid JSON"
        return None, f"invalid JSON ({text})"
    if orjson.dumps(obj) != line[:-1]:
        return None, "not in canonical form (extra whitespace, other escaping or duplicate keys)"
    return obj, None


def check_line(line: bytes, expected_prev: str | None, run_id: str | None = None) -> dict:
    """Parse and check one line; raise ValueError(reason) when it is not a valid event."""
    obj, reason = parse_line(line)
    if reason is None:
        reason = check_event(obj, expected_prev, run_id)
    if reason is not None:
        raise ValueError(reason)
    return obj


def verify_stream(stream: BinaryIO, line_no: int = 0, prev_hash: str | None = None,
                  run_id: str | None = None) -> tuple[int, str | None, str | None]:
    """Check every line of a journal read from stream; return (events, head hash, run id).

    Streams in chunks (the file is never loaded whole). Raises JournalError naming the first
    bad line. line_no/prev_hash/run_id let a caller continue from a known position.
    """
    buf = b""
    head = prev_hash
    while True:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        buf = buf + chunk if buf else chunk
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end + 1]
            line_no += 1
            obj, reason = parse_line(line)
            if reason is None:
                reason = check_event(obj, head, run_id)
            if reason is not None:
                raise JournalError(line_no, reason)
            if run_id is None:
                run_id = obj["run_id"]
            head = hashlib.sha256(line).hexdigest()
            start = end + 1
        buf = buf[start:]
        if len(buf) > MAX_LINE_BYTES:
            raise JournalError(line_no + 1, f"line longer than {MAX_LINE_BYTES} bytes")
    if buf:
        _, reason = parse_line(buf)
        raise JournalError(line_no + 1, reason or "last line is cut off (no newline)")
    return line_no, head, run_id
