"""What the terminal shows of a run: the status lines of `heidi status` (and `--watch`), and the
live progress line of `heidi run`, redrawn every second while a stage runs.

Formatting only: the views come from heidi.core / heidi.status; nothing here writes to the run.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

REDRAW_S = 1.0


def terminal_width(stream: TextIO | None = None) -> int | None:
    """Columns of the terminal `stream` (stdout) writes to, None when it is not a terminal."""
    stream = stream or sys.stdout
    try:
        if not stream.isatty():
            return None
    except (ValueError, AttributeError):
        return None
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    if not columns:  # a terminal that never said its size (a fresh pty)
        try:
            columns = int(os.environ.get("COLUMNS") or 80)
        except ValueError:
            columns = 80
    return max(columns, 20)


def cut(text: str, width: int | None) -> str:
    """text on one row of `width` columns (None: as is), an ellipsis where it was cut."""
    if width is None or len(text) < width:
        return text
    return text[:max(1, width - 2)] + "…"


def duration(seconds: float | None) -> str:
    """12s, 3m 04s, 2h 03m, 3d 04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def status_line(view: dict[str, Any]) -> str:
    """The first line of `heidi status` (scripts read it): run, status, state, round, mode, stage."""
    if view.get("run_id") is None:
        return f"no run in {view['out_dir']}"
    line = (f"run {view['run_id']}: {view['status']}, state {view['state']}, "
            f"round {view['round']}/{view['rounds']}, mode {view['mode']}")
    if view.get("stage") and view["state"] not in ("IDLE",):
        line += f", stage {view['stage']}"
    if view.get("pending_requests"):
        line += f", pending: {' '.join(view['pending_requests'])}"
    if view.get("last_error") and view["state"] == "ERROR":
        line += f"; error: {view['last_error']}"
    if view.get("interrupted"):
        line += (f"; no heidi process holds it: the next `heidi run`, tick or daemon runs "
                 f"{view.get('stage') or 'the stage'} again")
    return line


def detail_lines(view: dict[str, Any], width: int | None) -> list[str]:
    """The lines under the first one while a stage runs (or was left interrupted): since when,
    how long, who holds the run, the stage's log and its last line. None otherwise: a run at
    rest is one line, as scripts read it."""
    if view.get("run_id") is None:
        return []
    lines = []
    started = view.get("stage_started_at")
    if started:
        if view.get("interrupted"):
            how = "interrupted (no process holds the run)"
        else:
            holder = view.get("holder_pid")
            how = (f"running for {duration(view.get('stage_elapsed_s'))}"
                   + (f", pid {holder}" if holder else ""))
        lines.append(f"  {view['stage']} started {started}, {how}; run "
                     f"{duration(view.get('run_elapsed_s'))}")
    if view.get("stage_log") and started:
        lines.append(f"  log {view['stage_log']}")
        if view.get("stage_log_last_line"):
            lines.append(f"  > {view['stage_log_last_line']}")
    return [cut(line, width) for line in lines]


def status_text(view: dict[str, Any], width: int | None) -> list[str]:
    """`heidi status` as text: the status line with its containment, then the detail lines."""
    first = status_line(view)
    if "containment" in view:
        first += f"; containment: {view['containment']}"
    return [first] + detail_lines(view, width)


def watch(read: Callable[[], dict[str, Any]], interval_s: float, out: TextIO | None = None,
          count: int | None = None) -> None:
    """`heidi status --watch`: the status every interval_s, redrawn in place on a terminal (plain
    repeated output otherwise), until Ctrl-C (KeyboardInterrupt, left to the caller) or `count`
    draws."""
    out = out or sys.stdout
    drawn = 0
    n = 0
    while True:
        width = terminal_width(out)
        lines = status_text(read(), width)
        if width is not None:
            # every line kept to one row, so that moving up `drawn` rows finds the first one
            lines = [cut(line, width) for line in lines]
            out.write((f"\x1b[{drawn}F" if drawn else "") + "\x1b[J" + "\n".join(lines) + "\n")
        else:
            out.write("\n".join(lines) + "\n\n")
        out.flush()
        drawn = len(lines)
        n += 1
        if count is not None and n >= count:
            return
        time.sleep(interval_s)


class Progress:
    """`heidi run`'s one live line on a terminal; nothing when stdout is not one.

    Called with each view between transitions; while a stage runs (hours, for a train stage) a
    thread reads the run's state from disk every second and redraws the line: elapsed in the
    stage and the run, the pid, the stage's last log line."""

    def __init__(self, read: Callable[[], dict[str, Any]], out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.enabled = terminal_width(self.out) is not None
        self.read = read
        self.shown = False
        self._width = 0
        import threading  # here: `heidi status` imports this module too, and needs no thread
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._new_thread = threading.Thread

    def line(self, view: dict[str, Any]) -> str:
        text = (f"[round {view['round']}/{view['rounds']}] {view['state']}"
                + (f" ({view['stage']})" if view.get("stage") else "")
                + (" paused" if view.get("paused") else ""))
        if view.get("stage_elapsed_s") is not None:
            text += f" {duration(view['stage_elapsed_s'])}"
        if view.get("run_elapsed_s") is not None:
            text += f" · run {duration(view['run_elapsed_s'])}"
        text += f" · pid {os.getpid()}"
        if view.get("stage_elapsed_s") is not None and view.get("stage_log_last_line"):
            text += f" · {view['stage_log_last_line']}"
        return text

    def draw(self, view: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._done.is_set():
                return
            # padded over the previous text rather than cleared with an escape sequence
            text = cut(self.line(view), terminal_width(self.out))
            self.out.write("\r" + text.ljust(self._width))
            self.out.flush()
            self._width = len(text)
            self.shown = True

    def __call__(self, view: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.draw(view)
        if self._thread is None:
            self._thread = self._new_thread(target=self._redraw, name="heidi-progress", daemon=True)
            self._thread.start()

    def _redraw(self) -> None:
        while not self._done.wait(REDRAW_S):
            try:
                view = self.read()
            except Exception:  # a state.json being replaced, a log rotated: the next second
                continue
            if view.get("run_id") is not None:
                self.draw(view)

    def done(self) -> None:
        with self._lock:
            self._done.set()
            if self.enabled and self.shown:
                self.out.write("\n")
                self.out.flush()
        if self._thread is not None:
            self._thread.join(2.0)
