"""Errors heidi reports to users: one line each, with the exit code the CLI uses."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75


class HeidiError(Exception):
    """A failure a user sees as one line on stderr and an exit code."""

    exit_code = EXIT_FAILED


class ConfigError(HeidiError):
    """A bad setting: names the variable, the value and what is allowed."""

    exit_code = EXIT_USAGE


class UsageError(HeidiError):
    exit_code = EXIT_USAGE


class RunLocked(HeidiError):
    """Another process holds OUT_DIR/heidi.lock."""

    exit_code = EXIT_LOCKED


class RefusedError(HeidiError):
    """An action that does not apply to the run as it is (e.g. train-now outside collect mode)."""

    exit_code = EXIT_FAILED


class StateError(HeidiError):
    """state.json or the journal cannot be read or trusted."""

    exit_code = EXIT_FAILED


def os_error_line(exc: OSError) -> str:
    """`<path>: <strerror>` (`<src> -> <dst>: ...` for a rename), as one line; the bare error
    when the OSError names no file."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return what
    where = str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    return f"{where}: {what}"


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return os_error_line(exc).splitlines()[0]
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, HeidiError) and line:
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
