"""What a run in OUT_DIR owns, read from its journal: the files and directories archiving moves to
OUT_DIR/runs/<run_id>/ when a new run starts (`Archive`, a part of `Machine`). Everything else in
OUT_DIR is the user's."""
from __future__ import annotations

import errno
import os
import shutil
from typing import Any

from . import control
from ._fast import chain as _chain
from .config import Config
from .journal import JournalWriter

# heidi's own files in OUT_DIR that belong to no run: never archived.
SHARED = frozenset(("heidi.lock", "runs", "control", "heidi.pid", "daemon.json", "daemon.log"))


def owned_paths(cfg: Config) -> list[str]:
    """What the run in cfg.out_dir owns besides events.jsonl and state.json, relative to OUT_DIR,
    sorted (a directory before what is inside it): the damaged or torn copies heidi set aside,
    and every artifact path its journal recorded that lies inside OUT_DIR.

    Read leniently (an unreadable line gives nothing), and never the config file, the scripts,
    a hidden top-level entry or heidi's shared files, whatever a line says."""
    out = cfg.out_dir
    paths = set()
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(("state.json.corrupt-", "events.jsonl.torn-")):
            paths.add(name)
    scripts = os.path.realpath(cfg.scripts_dir)
    protected = {os.path.realpath(p) for p in (cfg.config_path, scripts, cfg.repo_root) if p}
    try:
        fh = open(cfg.journal_path, "rb")
    except FileNotFoundError:
        return sorted(paths)
    with fh:
        for line in fh:
            event, _ = _chain.parse_line(line)
            if not isinstance(event, dict) or not isinstance(event.get("artifact_paths"), list):
                continue
            for path in event["artifact_paths"]:
                if not isinstance(path, str) or not path or "\0" in path:
                    continue
                rel = os.path.normpath(os.path.relpath(path, out) if os.path.isabs(path) else path)
                top = rel.split(os.sep, 1)[0]
                if (rel in (".", "..") or top == ".." or top.startswith(".") or top in SHARED
                        or rel in ("events.jsonl", "state.json")):
                    continue
                real = os.path.realpath(os.path.join(out, rel))
                if (real in protected or any(p.startswith(real + os.sep) for p in protected)
                        or real.startswith(scripts + os.sep)):
                    continue  # never the config file or the scripts, nor a directory holding them
                paths.add(rel)
    return sorted(paths)


class Archive:
    """Machine's archiving of a finished run before a new one starts."""

    # set by Machine.__init__
    config: Config
    state: dict[str, Any] | None
    journal: JournalWriter | None
    _seen: tuple[Any, Any] | None
    _listed: tuple[int, list[str]] | None

    def _archive(self) -> None:
        """Move a finished run's own files to OUT_DIR/runs/<run_id>/ so a new run starts clean.

        What a run owns is read from its journal (state.json is only a cache): heidi's fixed
        files plus every path inside OUT_DIR that an event recorded in artifact_paths. Anything
        else in OUT_DIR (heidi.toml, scripts/, a user's notes or data) stays where it is."""
        assert self.state is not None
        cfg = self.config
        owned = owned_paths(cfg)  # read before the journal moves
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        from .stagelog import makedirs_private
        dest = os.path.join(cfg.out_dir, "runs", self.state["run_id"])
        makedirs_private(dest)
        # state.json first and the journal last: cut short anywhere, what is left in OUT_DIR is
        # a journal to rebuild the state from, or no run at all (never a state without its journal)
        moved: list[str] = []
        for rel in ["state.json"] + owned + ["events.jsonl"]:
            if any(rel.startswith(done + "/") for done in moved):
                continue  # inside a directory already moved
            src = os.path.join(cfg.out_dir, rel)
            if not os.path.lexists(src):
                continue
            target = os.path.join(dest, rel)
            if os.sep in rel:
                makedirs_private(os.path.dirname(target))
            try:
                os.rename(src, target)  # a file replaces its copy from an archive cut short
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                    continue  # an archive cut short and resumed: the first move won
                if exc.errno != errno.EXDEV:
                    raise
                shutil.move(src, target)  # a path on another filesystem (a symlinked data/)
            moved.append(rel)
        for path, _ in control.pending(cfg.control_dir):
            control.consume(path)  # requests aimed at the finished run
        self.state, self._seen, self._listed = None, None, None
