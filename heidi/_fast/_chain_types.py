"""What both journal-line twins share: the schema's constants, JournalError, and the NaN probe.

Defined once so that `_chain_py` and `_chain_c` raise the very same JournalError class.
"""
from __future__ import annotations

__all__ = ["KEYS", "EVENT_VERSION", "LEVELS", "MAX_LINE_BYTES", "MAX_MESSAGE_CHARS",
           "MAX_ERROR_CHARS", "MAX_ARTIFACT_CHARS", "READ_CHUNK_BYTES", "JournalError",
           "nan_literal"]

KEYS = ("event_version", "ts", "run_id", "round", "stage", "level", "event_type", "message",
        "counters_delta", "usage_delta", "artifact_paths", "error", "prev_hash")
EVENT_VERSION = "1.0"
LEVELS = frozenset(("info", "warn", "error", "success", "critical"))
MAX_LINE_BYTES = 1 << 20
MAX_MESSAGE_CHARS = 500
MAX_ERROR_CHARS = 200
MAX_ARTIFACT_CHARS = 100
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
