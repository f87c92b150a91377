"""Hot paths of heidi: each module here is a Cython extension with a pure-Python twin.

`heidi/_fast/X.py` selects `_X_c` (compiled) unless it is missing or HEIDI_NO_EXTENSIONS is set,
and falls back to `_X_py`. Both twins have the same API; tests run against both.
"""
from __future__ import annotations

import importlib
import os

MODULES = ("chain", "redact", "atomic", "supervise", "procstat")


def no_extensions() -> bool:
    """True when HEIDI_NO_EXTENSIONS asks for the pure-Python twins."""
    return os.environ.get("HEIDI_NO_EXTENSIONS", "") not in ("", "0")


def implementations() -> dict[str, str]:
    """Which implementation each _fast module uses: 'compiled' or 'pure-python'."""
    result = {}
    for name in MODULES:
        try:
            selector = importlib.import_module(f"heidi._fast.{name}")
        except ImportError:
            continue
        result[name] = "compiled" if getattr(selector, "COMPILED", False) else "pure-python"
    return result
