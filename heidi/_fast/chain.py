"""Selector for the journal-line module: compiled `_chain_c` unless absent or disabled."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import no_extensions

if TYPE_CHECKING:
    from ._chain_py import *  # noqa: F403
    COMPILED = False
else:
    try:
        if no_extensions():
            raise ImportError("HEIDI_NO_EXTENSIONS")
        from ._chain_c import *  # noqa: F403
        COMPILED = True
    except ImportError:
        from ._chain_py import *  # noqa: F403
        COMPILED = False
