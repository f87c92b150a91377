"""Reading a journal: strict readers, verify, the API's events pager, and the tail, head and
change checks the writer and the machine share (design.md §3.1). Imports nothing of journal.py.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from ._fast._chain_types import JournalError
from .errors import StateError
from .status import read_state

if TYPE_CHECKING:
    from .config import Config


class LazyModule:
    """A module imported at its first use: a tick with nothing to do, or `heidi status`, never
    pays for orjson or the chain's compiled module (design.md §10, start-up)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # from now on a plain attribute
        return value


orjson = LazyModule("orjson")
_chain = LazyModule("heidi._fast.chain")
_TAIL_READ_BYTES = 64 * 1024
MAX_EVENT_LINE_BYTES = 1 << 20  # a longer line in a page is reported, not returned


def read_tail(path: str) -> tuple[bytes | None, bytes]:
    """(last whole line or None, torn fragment after it) of a journal, reading only its end."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None, b""
        want = _TAIL_READ_BYTES
        while True:
            start = max(0, size - want)
            fh.seek(start)
            data = fh.read(size - start)
            last_nl = data.rfind(b"\n")
            fragment = data[last_nl + 1:] if last_nl >= 0 else data
            if last_nl < 0:
                if start == 0:
                    return None, fragment
                want *= 4
                continue
            prev_nl = data.rfind(b"\n", 0, last_nl)
            if prev_nl >= 0 or start == 0:
                return data[prev_nl + 1:last_nl + 1], fragment
            if want > _chain.MAX_LINE_BYTES * 2 + 2:
                return data[:last_nl + 1], fragment  # over-long line: verify reports it
            want *= 4


def count_lines(path: str) -> int:
    """Newlines in a file, counted in chunks (no parsing)."""
    count = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count


class Head(NamedTuple):
    """Where a journal ends, as state.json records it: events, hash of the last line (the run id
    when empty), the file's size and the offset where the last line starts."""

    events: int
    hash: str
    size: int
    offset: int


class JournalChanged(StateError):
    """The journal is not what heidi left: a line changed, went missing or was added by someone
    else. Nothing is appended past it."""

    def __init__(self, line_no: int, path: str = "") -> None:
        super().__init__(f"journal changed outside heidi at line {line_no}; see `heidi verify`")
        self.line_no = line_no
        self.path = path


def read_at(fd: int, start: int, end: int) -> bytes:
    """Bytes [start, end) of an open file (pread until done)."""
    parts = []
    while start < end:
        chunk = os.pread(fd, end - start, start)
        if not chunk:
            break
        parts.append(chunk)
        start += len(chunk)
    return b"".join(parts)


def head_matches(fd: int, head: Head) -> bool:
    """True when the line at [head.offset, head.size) is the recorded head: O(1), one pread."""
    if head.events == 0:
        return head.size == 0
    if not 0 <= head.offset < head.size:
        return False
    start = head.offset - 1 if head.offset else 0
    data = read_at(fd, start, head.size)
    if head.offset and data[:1] != b"\n":
        return False
    line = data[1:] if head.offset else data
    return line.endswith(b"\n") and hashlib.sha256(line).hexdigest() == head.hash


def line_before(fd: int, end: int) -> int:
    """Offset where the line that ends at `end` starts (reads backwards, as little as it can)."""
    want = 4096
    while True:
        start = max(0, end - want)
        data = read_at(fd, start, end)
        nl = data.rfind(b"\n", 0, len(data) - 1)
        if nl >= 0:
            return start + nl + 1
        if start == 0:
            return 0
        if want > 2 * _chain.MAX_LINE_BYTES:
            return end  # no line fits: head_matches then fails and says where
        want *= 4


def changed_at(path: str, events: int, head: str | None) -> int:
    """Line number of the first line that is not what heidi wrote (the error path: reads it all).

    events/head: what heidi last recorded (state.json, or the writer's own count and hash).
    """
    try:
        with open(path, "rb", buffering=0) as fh:
            count, last, _ = _chain.verify_stream(fh)
    except JournalError as exc:
        return exc.line_no if exc.line_no <= events else events + 1
    except OSError:
        return 1
    if count < events:
        return count + 1  # cut off: the first missing line
    if count == events and last != head:
        return max(events, 1)
    return events + 1  # lines after the recorded head that heidi did not write


def read_events(path: str) -> Iterable[dict]:
    """Every event of a journal, checked strictly (raises JournalError at the first bad line)."""
    prev: str | None = None
    run_id: str | None = None
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            try:
                event = _chain.check_line(line, prev, run_id)
            except ValueError as exc:
                raise JournalError(line_no, str(exc)) from None
            run_id = event["run_id"]
            prev = _chain.line_hash(line)
            yield event


def verify_journal(path: str, expected_head: tuple[int, str] | None = None
                   ) -> tuple[int, str | None, str | None]:
    """Strict read of a whole journal: (events, head hash, run id) or JournalError.

    expected_head (events, hash) from state.json detects a journal cut back to an earlier line.
    """
    with open(path, "rb", buffering=0) as fh:
        count, head, run_id = _chain.verify_stream(fh)
    if expected_head is not None:
        want_count, want_hash = expected_head
        if count < want_count:
            raise JournalError(count + 1, f"journal ends after {count} events but state.json "
                                          f"records {want_count}: the tail was cut off")
        if count == want_count and want_hash and head != want_hash:
            raise JournalError(count, "last line's hash differs from the head in state.json")
    return count, head, run_id


def verify_run(config: "Config", path: str | None = None) -> tuple[int, str | None, str | None]:
    """Strict check of a run's journal, and of state.json's head when it is there."""
    journal = path or config.journal_path
    head = None
    state_path = os.path.join(os.path.dirname(journal), "state.json")
    try:
        state = read_state(state_path)
    except StateError:
        state = None  # the journal is checked all the same; check_state_file says what is wrong
    if state is not None:
        head = (state["journal"]["events"], state["journal"]["head"])
    return verify_journal(journal, head)


# -- reading a page of events (the daemon's /api/v1/events) ---------------------------------

def _skip_lines(fh: Any, n: int) -> int:
    """Position fh just after its n-th newline, reading in chunks; returns the lines skipped."""
    if n <= 0:
        return 0
    done = 0
    pos = 0
    while True:
        chunk = fh.read(1 << 16)
        if not chunk:
            return done
        count = chunk.count(b"\n")
        if done + count < n:
            done += count
            pos += len(chunk)
            continue
        idx = -1
        for _ in range(n - done):
            idx = chunk.index(b"\n", idx + 1)
        fh.seek(pos + idx + 1)
        return n


def read_events_page(path: str, since: int, limit: int) -> tuple[list[Any], int]:
    """Events from line since+1 on, at most limit of them, and the `since` of the next page.

    Streams the file (never loads it whole); a last line still being written is left for later.
    """
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return [], since
    events: list[Any] = []
    with fh:
        line_no = _skip_lines(fh, since)
        if line_no < since:
            return [], line_no
        while len(events) < limit:
            line = fh.readline(MAX_EVENT_LINE_BYTES + 1)
            if not line:
                break
            if not line.endswith(b"\n"):
                if len(line) <= MAX_EVENT_LINE_BYTES:
                    break  # a line being appended right now: the next page has it
                while line and not line.endswith(b"\n"):  # over-long: skip it, say so
                    line = fh.readline(1 << 16)
                if not line:
                    break
                line_no += 1
                events.append({"line": line_no, "error": "line over 1 MiB"})
                continue
            line_no += 1
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                events.append({"line": line_no, "error": f"invalid JSON ({exc})"[:200]})
    return events, line_no
