"""heidi: drives teacher -> validate -> unit-test gate -> train -> eval loops, one journaled,
crash-safe transition at a time. The names below are the Python API (imported on first use,
so that `heidi version` or a cron tick does not pay for what it does not touch)."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_API = {
    "Clock": "clock", "MockClock": "clock", "Config": "config", "Core": "core",
    "ConfigError": "errors", "HeidiError": "errors", "RefusedError": "errors",
    "RunLocked": "errors", "StateError": "errors", "JournalError": "journal",
    "JournalWriter": "journal", "verify_journal": "journal", "StatusWriter": "status",
    "AsyncCollector": "collector", "MockProvider": "providers", "OpenAIProvider": "providers",
    "AnthropicProvider": "providers", "ProviderError": "providers",
}

if TYPE_CHECKING:
    from .clock import Clock, MockClock
    from .collector import AsyncCollector
    from .config import Config
    from .core import Core
    from .errors import ConfigError, HeidiError, RefusedError, RunLocked, StateError
    from .journal import JournalError, JournalWriter, verify_journal
    from .providers import AnthropicProvider, MockProvider, OpenAIProvider, ProviderError
    from .status import StatusWriter


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'heidi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def redact(text: str) -> str:
    """text with every secret replaced by a placeholder naming its kind ([GITHUB_TOKEN], ...)."""
    from ._fast.redact import redact as _redact
    return _redact(text)


__all__ = ["__version__", *_API, "redact"]
