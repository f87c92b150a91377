"""The event journal: append-only, hash-chained events.jsonl (schema v1.0, design.md §3.1).

JournalWriter continues the chain of an existing journal by reading only its tail, repairs a
torn last line (kept aside, never silently), redacts before writing and batches fsyncs.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

from ._fast import atomic as _atomic
from ._fast._chain_types import KEYS, JournalError  # noqa: F401 (journal.KEYS: the schema's keys)
from .clock import Clock, clock_from_env
from .errors import StateError
# the readers live in journal_read; named here too, so `from heidi.journal import X` still works
from .journal_read import (MAX_EVENT_LINE_BYTES, Head, JournalChanged, LazyModule,  # noqa: F401
                           changed_at, count_lines, head_matches, line_before, read_at, read_events,
                           read_events_page, read_tail, verify_journal, verify_run)
from .waiting import with_path

_chain = LazyModule("heidi._fast.chain")


class JournalWriter:
    """Appends events to one run's journal, continuing its hash chain across processes.

    head: None (unknown: read the journal's tail, counting its lines), (events, hash) of a
    caller that vouches for the count when the hash matches the last line, or a `Head` the
    caller has checked (no read at all; only a torn fragment may follow it, which is set aside).
    Before each append the writer checks that the file is still the size it left it.
    """

    def __init__(self, path: str, run_id: str, clock: Clock | None = None,
                 redact: Callable[[str], str] | None = None, fsync: bool = True,
                 head: Head | tuple[int, str | None] | None = None, round: int = 0,
                 batch: bool = False) -> None:
        self.path = os.fspath(path)
        self.run_id = run_id
        self.clock = clock or clock_from_env()
        self._redact = redact  # None: the default redactor, imported at the first emit
        self.fsync = fsync
        self.round = round
        self.repaired: str | None = None
        self.last_event: dict[str, Any] | None = None
        # batch=True holds a transition's lines until sync() and writes them with one write(2);
        # a crash before then loses only events that no state.json refers to yet.
        self.batch = batch
        self._pending: list[bytes] = []
        self._dirty = False
        self._torn = False  # a failed write may have left bytes past _disk_size
        self._changed: JournalChanged | None = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
            created = False
        except FileNotFoundError:
            parent = os.path.dirname(self.path) or "."
            os.makedirs(parent, mode=0o700, exist_ok=True)
            self._fd = os.open(self.path, flags | os.O_CREAT, 0o600)
            created = True
        try:
            if created and fsync:
                # fdatasync makes the appends durable, not the file's name: sync it once
                _atomic.fsync_dir(os.path.dirname(self.path) or ".")
            if isinstance(head, Head):
                self._open_at(head)
            else:
                self._open_tail(head)
        except BaseException:
            fd, self._fd = self._fd, -1
            os.close(fd)
            raise

    def _open_at(self, head: Head) -> None:
        self.count, self.prev_hash = head.events, head.hash
        self.size = self._disk_size = head.size
        self.head_offset = head.offset
        self._disk_head = (self.count, self.prev_hash)
        actual = os.fstat(self._fd).st_size
        if actual == head.size:
            return
        fragment = b""
        if actual > head.size:
            with open(self.path, "rb") as fh:
                fh.seek(head.size)
                fragment = fh.read(actual - head.size)
        if not fragment or b"\n" in fragment:
            raise JournalChanged(changed_at(self.path, head.events, head.hash), self.path)
        self._repair(fragment)

    def _open_tail(self, head: tuple[int, str | None] | None) -> None:
        last, fragment = read_tail(self.path)
        size = os.fstat(self._fd).st_size - len(fragment)
        if last is None:
            self.prev_hash = self.run_id
            self.count = 0
        else:
            event, _ = _chain.parse_line(last)
            if isinstance(event, dict) and event.get("run_id") != self.run_id:
                raise StateError(f"{self.path}: journal belongs to run {event.get('run_id')!r}, "
                                 f"not {self.run_id!r}")
            self.prev_hash = _chain.line_hash(last)
            if head is not None and head[1] == self.prev_hash and not fragment:
                self.count = head[0]
            else:
                self.count = count_lines(self.path)
        self.size = self._disk_size = size
        self.head_offset = size - len(last or b"")
        self._disk_head = (self.count, self.prev_hash)
        if fragment:
            self._repair(fragment)

    def _repair(self, fragment: bytes) -> None:
        """Set a torn last line aside, cut the journal back to its last whole line, say so."""
        self._set_aside(fragment)
        self.emit("journal_repaired",
                  f"journal ended in a cut-off line ({len(fragment)} bytes, kept in "
                  f"{os.path.basename(self.repaired or '')}); cut back to the last whole line",
                  level="warn")
        self.sync()

    def _set_aside(self, fragment: bytes) -> None:
        n = 1
        while os.path.exists(f"{self.path}.torn-{n}"):
            n += 1
        aside = f"{self.path}.torn-{n}"
        _atomic.atomic_write(aside, fragment, 0o600, self.fsync)
        os.truncate(self.path, self._disk_size)
        if self.fsync:
            self._fdatasync()
        self.repaired = aside

    @property
    def redact(self) -> Callable[[str], str]:
        if self._redact is None:
            from ._fast.redact import redact as default_redact
            self._redact = default_redact
        return self._redact

    @redact.setter
    def redact(self, value: Callable[[str], str]) -> None:
        self._redact = value

    @property
    def pending(self) -> bool:
        """Lines emitted but not yet written (batch mode)."""
        return bool(self._pending)

    @property
    def head(self) -> tuple[int, str]:
        """(events in the journal, hash of its last line — or the run id when empty)."""
        return self.count, self.prev_hash

    @property
    def position(self) -> Head:
        """The journal's end as this writer leaves it (pending lines included)."""
        return Head(self.count, self.prev_hash, self.size, self.head_offset)

    def fingerprint(self) -> tuple[int, int, int, int]:
        """(inode, device, size, mtime in ns) of the file this writer appends to: fstat, so it
        is the file written, whatever file the path names by now (a stat after a swap would
        vouch for the new file)."""
        return _atomic.fd_fingerprint(self._fd)

    def emit(self, event_type: str, message: str = "", *, round: int | None = None,
             stage: str = "pipeline", level: str = "info",
             counters_delta: Mapping[str, Any] | None = None,
             usage_delta: Mapping[str, Any] | None = None,
             artifact_paths: Iterable[str] | None = None, error: str | None = None) -> bytes:
        """Append one event; message and error are redacted, then cut to the schema's limits."""
        # message, error and paths redacted and cut, deltas checked, the line encoded and
        # hashed: one call to the chain's twin (compiled: no Python frame in the common case).
        # The event exactly as written is kept for callers that fold it.
        event, line, line_hash = _chain.emit_line(
            self.clock.iso(), self.run_id, self.round if round is None else round, stage, level,
            event_type, message, counters_delta, usage_delta, artifact_paths, error,
            self.prev_hash, self._redact or self.redact)
        self.last_event = event
        size = len(line)
        if self.batch:
            self._pending.append(line)
        else:
            self._append(line)
        self.prev_hash = line_hash
        self.count += 1
        if not self.batch:
            self._disk_head = (self.count, self.prev_hash)
        self.head_offset = self.size
        self.size += size
        self._dirty = True
        return line

    def _append(self, data: bytes) -> None:
        if self._torn:
            self._cut_back(self._disk_size)  # an earlier failed write's bytes, if still there
        # Still the size this writer left it? Otherwise another process wrote to it (or cut it):
        # append nothing, now or later, and say at which line it changed.
        if self._changed is None and _atomic.fd_fingerprint(self._fd)[2] != self._disk_size:
            events, last = self._disk_head
            self._changed = JournalChanged(changed_at(self.path, events, last), self.path)
        if self._changed is not None:
            self._pending.clear()
            raise self._changed
        try:
            _atomic.write_all(self._fd, data)
        except OSError as exc:
            # A full disk may take part of the data (a short write, then ENOSPC): cut it back to
            # the last whole line, so that no later append builds on a torn one.
            self._torn = True
            try:
                self._cut_back(self._disk_size)
            except OSError:
                pass  # _torn stays set: the next append cuts back first
            raise with_path(exc, self.path) from None
        self._disk_size += len(data)

    def _cut_back(self, size: int) -> None:
        """Truncate the file to `size` (bytes this writer wrote past it are dropped)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise with_path(exc, self.path) from None
        self._disk_size = size
        self._torn = False

    def flush(self) -> None:
        """Write the lines held back in batch mode (one write(2) for all of them); on an error
        they are still held (nothing of them stays in the file), for a later flush to write."""
        if self._pending:
            data = b"".join(self._pending)
            self._append(data)
            self._pending.clear()
            self._disk_head = (self.count, self.prev_hash)

    def sync(self) -> None:
        """Make every append since the last sync durable: one fdatasync for a whole transition
        (the journal alone makes a transition durable; state.json is rebuilt from it).

        An error leaves the journal as the last successful sync left it: lines written by this
        call but not made durable are cut back and held, so calling sync again (once the disk
        has room) writes them again rather than trusting pages a failed fdatasync may have lost.
        """
        if not self._pending:
            if self._dirty and self.fsync:
                self._fdatasync()
            self._dirty = False
            return
        start, head = self._disk_size, self._disk_head
        data = b"".join(self._pending)
        self._append(data)
        if self.fsync:
            try:
                self._fdatasync()
            except OSError:
                self._disk_head = head
                try:
                    self._cut_back(start)
                except OSError:
                    self._torn = True
                    self._disk_size = start
                raise
        self._pending.clear()
        self._disk_head = (self.count, self.prev_hash)
        self._dirty = False

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise with_path(exc, self.path) from None

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __del__(self) -> None:
        # a writer dropped without close(): its fd must not leak (nothing held back is written)
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            os.close(fd)

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
