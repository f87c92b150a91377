"""heidi: drives teacher -> validate -> unit-test gate -> train -> eval loops, one journaled,
crash-safe transition at a time. The names below are the Python API."""
from ._version import __version__
from .clock import Clock, MockClock
from .config import Config
from .core import Core
from .errors import ConfigError, HeidiError, RefusedError, RunLocked, StateError
from .journal import JournalError, JournalWriter, verify_journal
from .status import StatusWriter


def redact(text: str) -> str:
    """text with every secret replaced by a placeholder naming its kind ([GITHUB_TOKEN], ...)."""
    from ._fast.redact import redact as _redact
    return _redact(text)


__all__ = ["__version__", "Clock", "MockClock", "Config", "Core", "ConfigError", "HeidiError",
           "RefusedError", "RunLocked", "StateError", "JournalError", "JournalWriter",
           "verify_journal", "StatusWriter", "redact"]
