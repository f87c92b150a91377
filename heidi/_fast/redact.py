"""Secret redaction: the compiled `_redact_c` unless it is absent or HEIDI_NO_EXTENSIONS is set.

Other code imports from here only; `_redact_py` is the same API in pure Python (the reference).
Redacting a stream line by line (`redact_lines`, `LineRedactor`) is `_redact_stream`'s, the
same code whichever twin redacts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import no_extensions
from ._redact_rules import env_name_is_secret
from ._redact_stream import CUT_OVERLAP_CHARS, KEY_BLOCK_MAX_CHARS, LineRedactor, redact_lines

__all__ = ("COMPILED", "CUT_OVERLAP_CHARS", "KEY_BLOCK_MAX_CHARS", "LineRedactor", "RULE_NAMES",
           "Redactor", "default_redactor", "env_name_is_secret", "redact", "redact_lines",
           "reset_default_redactor")

if TYPE_CHECKING:
    from ._redact_py import RULE_NAMES, Redactor, default_redactor, redact, reset_default_redactor
    COMPILED = False
else:
    try:
        if no_extensions():
            raise ImportError("HEIDI_NO_EXTENSIONS is set")
        from ._redact_c import (RULE_NAMES, Redactor, default_redactor, redact,
                                reset_default_redactor)
        COMPILED = True
    except ImportError:
        from ._redact_py import (RULE_NAMES, Redactor, default_redactor, redact,
                                 reset_default_redactor)
        COMPILED = False
