"""Selector for the atomic module: compiled `_atomic_c` unless absent or disabled."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import no_extensions

if TYPE_CHECKING:
    from ._atomic_py import *  # noqa: F403
    COMPILED = False
else:
    try:
        if no_extensions():
            raise ImportError("HEIDI_NO_EXTENSIONS")
        from ._atomic_c import *  # noqa: F403
        COMPILED = True
    except ImportError:
        from ._atomic_py import *  # noqa: F403
        COMPILED = False
