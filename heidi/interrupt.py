"""Signals end the process, never the run: SIGTERM, SIGINT or SIGHUP to `heidi run`, `tick` or
`daemon` ends the running stage (grace, then kill) and leaves the run interrupted, for the next
heidi process to continue in the same run_id. Only `heidi stop` ends a run."""
from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, no stubs (see signals_interrupt)
import signal
import threading
from typing import Any

from .errors import HeidiError

SIGNALS = (int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGHUP))  # ints: swapped each tick


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(HeidiError):
    """The process was told to end by a signal; the run stays resumable. Exit code 128 + signal,
    as a shell reports a process that a signal ended."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class Interrupt:
    """Set once by a signal handler (or by the daemon's main thread); read by the holder of the
    run, whose stage runner polls it with the stop requests."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler signals_interrupt installs."""
        self.set(signum)

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""

    def error(self, what: str = "") -> Interrupted:
        assert self.signum is not None
        return Interrupted(self.signum, f"{self.name}: {what or 'stopped between stages'}; the run "
                           "is interrupted, not stopped: the next `heidi run`, tick or daemon "
                           "continues it")


class signals_interrupt:
    """While inside, the signals set `interrupt` instead of ending the process (main thread only;
    elsewhere nothing changes). The previous handlers come back on the way out.

    Entered on every tick: the handlers are swapped with `_signal.signal`, the C function behind
    `signal.signal`, whose wrapper turns each previous handler into an enum by way of a raised
    ValueError (~7 µs a call, 6 calls a tick)."""

    __slots__ = ("interrupt", "previous", "signals")

    def __init__(self, interrupt: Interrupt, signals: tuple[int, ...] = SIGNALS) -> None:
        self.interrupt = interrupt
        self.signals = signals
        self.previous: list[tuple[int, Any]] = []

    def __enter__(self) -> Interrupt:
        if threading.get_ident() != threading.main_thread().ident:
            return self.interrupt
        handler = self.interrupt.handle
        previous = self.previous
        try:
            for sig in self.signals:
                previous.append((sig, _signal.signal(sig, handler)))
        except BaseException:
            self._restore()
            raise
        return self.interrupt

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self.previous = self.previous, []
        for sig, old in reversed(previous):
            if old is not None:  # None: a handler not installed from Python, which none can restore
                _signal.signal(sig, old)
