"""Redacting a stream line by line, once for both redact twins: `heidi redact` (redact_lines)
and stage logs (heidi.stagelog) follow this one rule for private-key blocks that span lines.

Not a hot path (a few regex gates per line around the twin's redact()), so it is plain Python.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from . import _redact_rules as _rules

__all__ = ("CUT_OVERLAP_CHARS", "KEY_BLOCK_MAX_CHARS", "LineRedactor", "redact_lines")

# A BEGIN ... PRIVATE KEY line opens a block: every line after it is hidden -- whatever it looks
# like, since other output may be interleaved with the key -- until its END line, or until this
# many characters were hidden without one. Then lines show again: a cut-off key must not swallow
# the rest of a multi-day log. The largest PEM private keys (RSA 16384, PGP key blocks with
# subkeys) are 10-20 kB, so a whole key stays hidden.
KEY_BLOCK_MAX_CHARS = 64 * 1024

# A line too long to hold (a stage log's 64 KiB) is redacted in pieces. So that a secret
# straddling a cut is seen whole, a piece's last characters are held back and redacted again at
# the head of the next piece: at least this many, several times the longest real token (JWTs
# run to a few KB; a hex-encoded secret is twice its length).
CUT_OVERLAP_CHARS = 8 * 1024

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

    def piece(self, text: str) -> tuple[str | None, str]:
        """A piece of a line too long to hold, without its end: (what may be shown of it now,
        or None; the tail of `text` to put, unredacted, in front of the next piece).

        The tail held back is the last CUT_OVERLAP_CHARS characters when redacting `text` whole
        left them untouched: then no secret that starts before them and is at most that long
        crosses the cut, and one that starts in them is redacted with the next piece. When a
        match reaches into them, a cut further back is taken where redacting the two sides
        apart gives what redacting the whole gives (no match crosses it). If none within half
        the piece does (one match longer than that), or within a private-key block, the piece
        is shown whole and nothing is held back, as a line is.
        """
        if "\x1b" in text:
            text = _ANSI.sub("", text)
        keep = CUT_OVERLAP_CHARS
        if self._in_block or "-----BEGIN" in text or len(text) < 2 * keep:
            return self.line(text), ""
        redact = self._redact
        whole = redact(text)
        if whole.endswith(text[-keep:]):
            return whole[:len(whole) - keep], text[-keep:]
        keep *= 2
        while keep <= len(text) // 2:
            head, tail = text[:-keep], text[-keep:]
            shown = redact(head)
            if whole.startswith(shown) and shown + redact(tail) == whole:
                return shown, tail
            keep *= 2
        return whole, ""

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
