"""Where a stage's output goes: redacted line by line into its log file and a bounded tail.

`StageLog(path, redact).write` is the on_output callback of `heidi._fast.supervise`; memory stays
bounded however much a stage prints, and nothing reaches the file before it is redacted (line by
line, private-key blocks that span lines hidden as `heidi redact` hides them: LineRedactor).
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable

from ._fast.redact import LineRedactor

__all__ = ("StageLog", "MAX_LINE_BYTES", "makedirs_private")

# A "line" longer than this (a progress bar redrawn with \r, a binary dump) is flushed in pieces,
# without a newline added, so that memory stays bounded. Each piece's tail is held back and
# redacted again with the next (LineRedactor.piece): a secret across the cut is seen whole.
MAX_LINE_BYTES = 64 * 1024

def _utf8_cut(data: bytes | bytearray, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 sequence (if data is UTF-8 at all)."""
    cut = limit
    for back in range(1, 4):
        if limit - back < 0:
            break
        byte = data[limit - back]
        if byte & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        if byte & 0xC0 == 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                cut = limit - back  # the sequence would be cut: leave it for the next piece
        break
    return cut if cut > 0 else limit


def makedirs_private(path: str) -> None:
    """os.makedirs(path), every directory it creates 0700 whatever the umask (os.makedirs gives
    its mode only to the leaf): a run's logs and data are nobody else's business. Existing
    directories are left as they are."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass


class StageLog:
    """Redacts a stage's output line by line, appends it to `path` (0600, parent dirs 0700;
    None = no file) and keeps the last `tail_bytes` characters for error events.

    A write error on the file (disk full) does not interrupt the stage: the file stops, the tail
    goes on, and `error` says what happened."""

    def __init__(self, path: str | None, redact: Callable[[str], str],
                 tail_bytes: int = 64 * 1024) -> None:
        redactor = LineRedactor(redact)
        self._show = redactor.line  # a line as it may be shown, or None
        self._piece = redactor.piece
        self._partial = bytearray()
        self._tail: collections.deque[str] = collections.deque()
        self._tail_chars = 0
        self._tail_max = max(0, int(tail_bytes))
        self._closed = False
        self._fd = -1
        self.path = path
        self.error: str | None = None
        self.bytes_in = 0
        if path is not None:
            makedirs_private(os.path.dirname(os.path.abspath(path)))
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    # -- the on_output callback

    def write(self, chunk: bytes) -> None:
        if self._closed:
            raise ValueError("write to a closed StageLog")
        if not chunk:
            return
        self.bytes_in += len(chunk)
        partial = self._partial
        if b"\n" not in chunk and len(partial) + len(chunk) <= MAX_LINE_BYTES:
            partial += chunk  # a line written in many small pieces: amortized, no re-splitting
            return
        data = bytes(partial) + chunk if partial else chunk
        lines = data.split(b"\n")
        rest = lines.pop()
        out: list[str] = []
        show = self._show
        for line in lines:  # (self._line inlined: this loop runs for every line a stage prints)
            shown = show(line.decode("utf-8", "replace") + "\n")
            if shown is not None:
                out.append(shown)
        while len(rest) > MAX_LINE_BYTES:
            cut = _utf8_cut(rest, MAX_LINE_BYTES)
            # surrogateescape: the tail held back goes back to exactly its bytes. It is under
            # half the piece's characters, so fewer bytes than the piece: each turn advances.
            shown, held = self._piece(rest[:cut].decode("utf-8", "surrogateescape"))
            if shown:
                if not shown.isascii():  # undecodable bytes show as U+FFFD, as in a line
                    shown = shown.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                out.append(shown)
            rest = held.encode("utf-8", "surrogateescape") + rest[cut:]
        self._partial = bytearray(rest)
        if out:
            self._emit(out)

    def close(self) -> None:
        """Flush the last, unterminated line and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._partial:
                out: list[str] = []
                self._line(bytes(self._partial), "", out)
                self._partial = bytearray()
                if out:
                    self._emit(out)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> StageLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tail(self, max_chars: int) -> str:
        """The last max_chars characters of redacted output (complete lines only until close)."""
        if max_chars <= 0:
            return ""
        text = "".join(self._tail)
        return text[-max_chars:]

    # -- internals

    def _line(self, raw: bytes, end: str, out: list[str]) -> None:
        shown = self._show(raw.decode("utf-8", "replace") + end)
        if shown is not None:
            out.append(shown)

    def _emit(self, out: list[str]) -> None:
        if self._fd >= 0:
            data = "".join(out).encode("utf-8", "surrogateescape")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self.error = f"cannot write stage log {self.path}: {exc.strerror or exc}"
                os.close(self._fd)
                self._fd = -1
        if self._tail_max:
            tail = self._tail
            for text in out:
                tail.append(text)
                self._tail_chars += len(text)
            while len(tail) > 1 and self._tail_chars - len(tail[0]) >= self._tail_max:
                self._tail_chars -= len(tail.popleft())
