"""Opening a run from disk: state.json checked against the journal's end, caught up or rebuilt
by replaying it (the `Recovery` half of `Machine`), and `heidi verify`'s check of state.json."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

from ._fast._chain_types import JournalError
from .clock import Clock
from .config import Config
from .errors import StateError
from .journal import (Head, JournalChanged, JournalWriter, LazyModule, changed_at, head_matches,
                      line_before)
from .lock import RunLock
from .loop import NEW_STATE_KEYS, apply_event, empty_state
from .status import fingerprint, read_state

_chain = LazyModule("heidi._fast.chain")


class Recovery:
    """Machine's opening and recovery: what it reads from disk before anything is appended."""

    # set by Machine.__init__
    config: Config
    clock: Clock
    lock: RunLock
    state: dict[str, Any] | None
    journal: JournalWriter | None
    _seen: tuple[Any, Any] | None
    _journal_path: str
    _state_path: str
    # Machine's transitions, which a recovery ends with
    _save: Callable[[], None]
    _emit: Callable[..., None]
    _advance_round: Callable[[], None]

    def _reuse(self) -> bool:
        """Keep the state in memory when the files are exactly as this process left them."""
        cfg, state, seen = self.config, self.state, self._seen
        if seen is None or state is None:
            return False
        journal_seen = fingerprint(self._journal_path)
        if (journal_seen, fingerprint(self._state_path)) != seen:
            self._seen = None
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            return False
        if self.journal is None:  # else: kept open by release(), on this very file (same inode)
            self.journal = JournalWriter(self._journal_path, state["run_id"], self.clock,
                                         fsync=cfg.fsync, batch=True, head=_recorded_head(state),
                                         round=state["current_round"])
        return True

    def _read_state_file(self, journal_size: int) -> dict[str, Any] | None:
        """state.json, or None when missing; a damaged one is kept aside (rebuilt from the journal)."""
        cfg = self.config
        try:
            state = read_state(cfg.state_path)  # StateError also for a state of the wrong shape
        except StateError:
            if not journal_size:
                raise
            # state.json is derived from the journal: keep the damaged copy, rebuild the state.
            n = 1
            while os.path.exists(f"{cfg.state_path}.corrupt-{n}"):
                n += 1
            os.rename(cfg.state_path, f"{cfg.state_path}.corrupt-{n}")
            return None
        return state

    def _load(self, verify_chain: bool = False) -> None:
        """Read the run from disk: state.json checked against the journal's end in O(1), caught
        up with lines it missed, or rebuilt from the whole journal when it is missing or damaged.

        The journal is the truth: a line that changed, went missing or broke the chain stops
        here (JournalChanged) before anything is appended.
        """
        cfg = self.config
        self.state, self._seen = None, None
        try:
            journal_stat = os.stat(cfg.journal_path)
            journal_size, journal_mtime = journal_stat.st_size, journal_stat.st_mtime_ns
        except FileNotFoundError:
            journal_size, journal_mtime = 0, None
        state = self._read_state_file(journal_size)
        older = state is not None and journal_size > 0 and any(k not in state for k in NEW_STATE_KEYS)
        if older:
            state = None  # an older heidi's state.json (usage summed whole): rebuilt from the journal
        if state is None and not journal_size:
            return
        if state is not None and not journal_size:
            raise StateError(f"{cfg.state_path} names run {state.get('run_id')!r} but "
                             f"{cfg.journal_path} is missing or empty")
        head = _recorded_head(state) if state is not None else None
        note, touched = None, False
        with open(cfg.journal_path, "rb") as fh:
            fd = fh.fileno()
            if head is not None and head.offset < 0 and head.size <= journal_size:
                head = head._replace(offset=line_before(fd, head.size))  # older state.json
            if head is None:
                state, head = self._replay(fh, None, None)
                if not head.events:
                    raise StateError(f"{cfg.journal_path}: holds no whole event (only a cut-off "
                                     "line); cannot tell which run it is")
                note = (f"state.json {'of an older heidi ' if older else ''}rebuilt from the "
                        f"journal ({head.events} events)")
            else:
                if journal_size < head.size or not head_matches(fd, head):
                    raise JournalChanged(changed_at(cfg.journal_path, head.events, head.hash),
                                         cfg.journal_path)
                # Size and last line as recorded, but written to since (an edit of the same
                # size, a swap, or lines heidi has not folded yet): check every line below the
                # head too. Only then, or when taken for a long stay: not on every tick.
                assert state is not None
                touched = journal_mtime != state["journal"].get("mtime_ns")
                if verify_chain or touched or journal_size != head.size:
                    _verify_upto(fh, head, cfg.journal_path)
                if journal_size > head.size:
                    # state.json was merely behind (a crash, a power loss, a full disk between
                    # the journal and it): caught up and rewritten, nothing journaled -- so a
                    # tick failing again and again on a full disk appends nothing
                    before = head.events
                    state, head = self._replay(fh, state, head)
                    touched = touched or head.events > before
        assert state is not None
        self.state = state
        self.journal = JournalWriter(cfg.journal_path, state["run_id"], self.clock,
                                     fsync=cfg.fsync, batch=True, head=head,
                                     round=state["current_round"])
        if self.journal.repaired is not None:
            # the writer set a torn last line aside and journaled it: fold that event in too
            apply_event(state, self.journal.last_event)  # type: ignore[arg-type]
        if note is not None:
            # state.json first: while it cannot be written (a full disk) the rebuild is not
            # journaled, or each failing tick would append another state_recovered
            self._save()
            self._emit("state_recovered", note, level="warn")
        if note is not None or self.journal.repaired is not None or touched:
            self._save()  # touched alone: record the new mtime, so the next tick is O(1) again
        self.journal.round = state["current_round"]
        if state["status"] == "running" and state["state"] == "IDLE" and state["current_round"] == 0:
            # The starting process died between pipeline_start and round_start: finish the start.
            self._advance_round()
            self._save()

    def _replay(self, fh: Any = None, state: dict[str, Any] | None = None,
                head: Head | None = None) -> Any:
        """replay() of this run's journal; called without a file, opens it and returns the state."""
        if fh is None:
            with open(self.config.journal_path, "rb") as journal:
                return replay(journal, self.config.journal_path)[0]
        return replay(fh, self.config.journal_path, state, head)


def replay(fh: Any, path: str, state: dict[str, Any] | None = None,
           head: Head | None = None) -> tuple[dict[str, Any], Head]:
    """Fold the journal's whole lines after `head` (every line when None) into `state` (a fresh
    one when None), each checked strictly (JournalChanged names the first that fails); a torn
    last line is left for the writer. Returns (state, head)."""
    if state is None or head is None:
        state, head = empty_state(), Head(0, "", 0, 0)
    events, prev, pos, offset = head
    expected: str | None = prev or None
    run_id = state["run_id"]
    fh.seek(pos)
    for line in fh:
        if not line.endswith(b"\n"):
            break  # cut off by a crash: set aside by the JournalWriter
        try:
            event = _chain.check_line(line, expected, run_id)
        except ValueError:
            raise JournalChanged(events + 1, path) from None
        if run_id is None:
            run_id = state["run_id"] = event["run_id"]
        apply_event(state, event)
        expected = _chain.line_hash(line)
        events += 1
        offset, pos = pos, pos + len(line)
    head = Head(events, expected or "", pos, offset)
    state["journal"] = {"events": events, "head": expected, "bytes": pos, "head_offset": offset,
                        "mtime_ns": os.fstat(fh.fileno()).st_mtime_ns}
    return state, head


def state_from_journal(journal_path: str, state: dict[str, Any] | None, problem: str | None
                       ) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The second half of core.run_state, read only: the journal replayed, for a state.json that
    is behind it (`state`, caught up from its recorded head), missing (neither) or damaged
    (`problem`, what read_state said) -- the journal is the truth, state.json its cache, which
    the next process that takes the run writes again.

    Returns (state, why, note): why "missing", "damaged" or "behind", and the line that says so
    (None, None for a state with no head to catch up from). Raises what the replay finds
    (JournalChanged)."""
    head = _recorded_head(state) if state is not None else None
    behind = state is not None
    if state is not None:
        if head is None:
            return state, None, None
        state = copy.deepcopy(state)
    with open(journal_path, "rb") as fh:
        if head is not None:
            fd = fh.fileno()
            if head.offset < 0:
                head = head._replace(offset=line_before(fd, head.size))  # an older state.json
            if not head_matches(fd, head):
                raise JournalChanged(changed_at(journal_path, head.events, head.hash),
                                     journal_path)
        state, head = replay(fh, journal_path, state, head)
    if not head.events:
        raise StateError(problem or f"{journal_path}: holds no whole event")
    shown = f"shown from the journal ({head.events} events)"
    if problem is not None:
        return state, "damaged", (f"{problem}; {shown}; the next tick, `heidi run` or daemon "
                                  "rebuilds it")
    if behind:
        return state, "behind", (f"state.json is behind the journal; {shown}; the next tick, "
                                 "`heidi run` or daemon catches it up")
    return state, "missing", (f"no state.json; {shown}; the next tick, `heidi run` or daemon "
                              "writes it again")


_NOT_FOLDED = ("round", "pending_requests")  # written beside the folded state, not by apply_event


def check_state_file(journal_path: str) -> tuple[str, str]:
    """Replay a (verified) journal and compare state.json beside it with the state it gives.

    ("absent" | "matches" | "behind", one line); raises StateError when state.json disagrees
    with the journal. "behind" (fewer events, agreeing up to them) is what a crash or power
    loss leaves: the next process that takes the run catches it up.
    """
    import orjson
    state_path = os.path.join(os.path.dirname(journal_path), "state.json")
    try:
        state = read_state(state_path)
    except StateError as exc:
        raise StateError(f"state.json disagrees with the journal: {exc}") from None
    if state is None:
        return "absent", "no state.json (the next process that takes the run rebuilds it)"
    recorded: dict[str, Any] = state["journal"]  # its shape checked by read_state
    want = recorded["events"]
    replayed = empty_state()
    count = pos = offset = 0
    prev = None
    with open(journal_path, "rb") as fh:
        for line in fh:
            if count == want:
                break
            apply_event(replayed, orjson.loads(line))
            prev = _chain.line_hash(line)
            count += 1
            offset, pos = pos, pos + len(line)
        behind = count == want and fh.read(1) != b""
    replayed["journal"] = {"events": count, "head": prev, "bytes": pos, "head_offset": offset}
    on_disk = {k: v for k, v in state.items() if k not in _NOT_FOLDED}
    if any(k not in state for k in NEW_STATE_KEYS):
        # an older heidi's state.json: its usage was folded by another rule (summed whole), and
        # the keys it lacks are rebuilt by the next process that takes the run
        for key in ("usage",) + NEW_STATE_KEYS:
            on_disk.pop(key, None)
            replayed.pop(key, None)
    # the mtime is the file's, not the events' (a copy of the run changes it); head_offset is
    # missing from the state.json of an older heidi
    on_disk["journal"] = {k: v for k, v in recorded.items() if k != "mtime_ns"}
    if "head_offset" not in recorded:
        del replayed["journal"]["head_offset"]
    for key in sorted(set(on_disk) | set(replayed)):
        if on_disk.get(key, "(missing)") != replayed.get(key, "(missing)"):
            raise StateError(f"state.json disagrees with the journal: {key} is "
                             f"{_short(on_disk.get(key, '(missing)'))}, replaying the journal's "
                             f"first {count} events gives {_short(replayed.get(key, '(missing)'))}")
    if behind:
        return "behind", (f"state.json is behind the journal (it records {want} events); the next "
                          "process that takes the run catches it up")
    return "matches", "state.json matches the journal"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _recorded_head(state: dict[str, Any]) -> Head | None:
    """The journal's end as state.json records it; None when it records none to check against
    (then the state is rebuilt from the journal). offset -1: not recorded (an older heidi)."""
    journal = state.get("journal")
    if not isinstance(journal, dict):
        return None
    events, hash_ = journal.get("events"), journal.get("head")
    size, offset = journal.get("bytes"), journal.get("head_offset", -1)
    if (type(events) is not int or events <= 0 or type(hash_) is not str
            or type(size) is not int or size <= 0 or type(offset) is not int):
        return None
    return Head(events, hash_, size, offset)


class _Upto:
    """A file read only up to `end` (verify_stream reads through it)."""

    def __init__(self, fh: Any, end: int) -> None:
        self.fh, self.left = fh, end
        fh.seek(0)

    def read(self, size: int) -> bytes:
        data = self.fh.read(min(size, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


def _verify_upto(fh: Any, head: Head, path: str) -> None:
    """The whole chain up to the recorded head checked strictly (`heidi run`, the daemon)."""
    try:
        count, last, _ = _chain.verify_stream(_Upto(fh, head.size))
    except JournalError as exc:
        raise JournalChanged(exc.line_no, path) from None
    if (count, last) != (head.events, head.hash):
        raise JournalChanged(min(count, head.events) + 1 if count != head.events else count, path)
