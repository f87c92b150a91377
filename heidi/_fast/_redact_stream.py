"""Redacting a stream line by line, once for both redact twins: `heidi redact` (redact_lines)
and stage logs (heidi.stagelog) follow this one rule for private-key blocks that span lines.

Not a hot path (a few regex gates per line around the twin's redact()), so it is plain Python.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from . import _redact_rules as _rules

__all__ = ("KEY_BLOCK_MAX_CHARS", "LineRedactor", "redact_lines")

# A BEGIN ... PRIVATE KEY line opens a block: every line after it is hidden -- whatever it looks
# like, since other output may be interleaved with the key -- until its END line, or until this
# many characters were hidden without one. Then lines show again: a cut-off key must not swallow
# the rest of a multi-day log. The largest PEM private keys (RSA 16384, PGP key blocks with
# subkeys) are 10-20 kB, so a whole key stays hidden.
KEY_BLOCK_MAX_CHARS = 64 * 1024

_ANSI = re.compile(_rules.ANSI_PATTERN)
_PEM_BEGIN = re.compile(_rules.PEM_BEGIN_PATTERN)
_PEM_END = re.compile(_rules.PEM_END_PATTERN)
_PLACEHOLDER = _rules.PRIVATE_KEY_PLACEHOLDER


def _line_ending(line: str) -> str:
    if line.endswith("\r\n"):
        return "\r\n"
    return "\n" if line.endswith("\n") else ""


class LineRedactor:
    """One stream's redaction: `line(text)` gives what may be shown of a line (its ending kept),
    or None for a line hidden inside a private-key block.

    A key block in a line becomes "[PRIVATE_KEY]" (text around it is redacted and kept); a block
    left open hides the lines after it as KEY_BLOCK_MAX_CHARS says. ANSI escapes are stripped
    first, so that a colour code cannot split BEGIN or END.
    """

    __slots__ = ("_redact", "_in_block", "_hidden")

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self._in_block = False
        self._hidden = 0

    @property
    def in_block(self) -> bool:
        """True while lines are hidden: a BEGIN line was seen and no END yet."""
        return self._in_block

    def line(self, line: str) -> str | None:
        if "\x1b" in line:
            line = _ANSI.sub("", line)
        if self._in_block:
            end = _PEM_END.search(line)
            if end is not None:
                self._in_block = False
                line = line[end.end():]
                if not line.strip():
                    return None
            elif self._hidden + len(line) <= KEY_BLOCK_MAX_CHARS:
                self._hidden += len(line)
                return None
            else:
                self._in_block = False  # no END within the bound: an ordinary line again
        if "-----BEGIN" not in line:
            return self._redact(line)
        return self._cut_blocks(line)

    def _cut_blocks(self, line: str) -> str:
        pieces = []
        while True:
            begin = _PEM_BEGIN.search(line)
            if begin is None:
                if line:
                    pieces.append(self._redact(line))
                break
            if begin.start():
                pieces.append(self._redact(line[:begin.start()]))
            pieces.append(_PLACEHOLDER)
            end = _PEM_END.search(line, begin.end())
            if end is None:
                self._in_block = True  # the block goes on over the next lines
                self._hidden = 0
                pieces.append(_line_ending(line))
                break
            line = line[end.end():]
        return "".join(pieces)


def redact_lines(lines: Iterable[str], redact: Callable[[str], str]) -> Iterator[str]:
    """Redact a stream of lines (each with its ending) lazily, as LineRedactor does; hidden
    lines yield nothing."""
    redactor = LineRedactor(redact)
    for line in lines:
        shown = redactor.line(line)
        if shown is not None:
            yield shown
