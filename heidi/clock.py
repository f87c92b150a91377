"""Time for timestamps: the wall clock, or a fixed one for repeatable tests (HEIDI_CLOCK)."""
from __future__ import annotations

import os
import time

from .errors import ConfigError


_last: list = [None, "", None, ""]  # (second, its text, ms, its text): events come in bursts


def format_ts(epoch_s: float) -> str:
    """UTC ISO-8601 with milliseconds and Z, as the journal's `ts`: 2026-02-20T07:45:38.307Z."""
    total_ms = round(epoch_s * 1000)
    cache = _last
    if cache[2] == total_ms:
        return cache[3]
    secs, ms = divmod(total_ms, 1000)
    if cache[0] != secs:
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        cache[0] = secs
    text = f"{cache[1]}.{ms:03d}Z"
    cache[2], cache[3] = total_ms, text
    return text


def parse_ts(text: str) -> float:
    """Epoch seconds of an ISO-8601 UTC time ('Z' or '+00:00'); ValueError if not one."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    from datetime import UTC, datetime  # here: most commands never parse a time
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if parsed.utcoffset() != UTC.utcoffset(None):
        raise ValueError("not UTC")
    return parsed.timestamp()


class Clock:
    """The real wall clock."""

    def now(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    def iso(self) -> str:
        """The current time as a journal `ts`."""
        return format_ts(self.now())


class MockClock(Clock):
    """A clock frozen at one instant (optionally advancing by step_s on each read)."""

    def __init__(self, at: float | str = 0.0, step_s: float = 0.0) -> None:
        self._now = parse_ts(at) if isinstance(at, str) else float(at)
        self._step_s = step_s

    def now(self) -> float:
        current = self._now
        self._now += self._step_s
        return current

    def set(self, at: float | str) -> None:
        self._now = parse_ts(at) if isinstance(at, str) else float(at)

    def advance(self, seconds: float) -> None:
        self._now += seconds


def clock_from_env(environ: dict | None = None) -> Clock:
    """MockClock when HEIDI_CLOCK holds an ISO-8601 UTC time, else the real clock."""
    env = os.environ if environ is None else environ
    raw = env.get("HEIDI_CLOCK", "")
    if not raw:
        return Clock()
    try:
        return MockClock(raw)
    except ValueError:
        raise ConfigError(f"HEIDI_CLOCK={raw!r}: must be an ISO-8601 UTC time such as "
                          "2026-02-20T07:45:38.307Z") from None
