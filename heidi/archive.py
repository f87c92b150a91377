"""What a run in OUT_DIR owns, read from its journal: the files and directories archiving moves to
OUT_DIR/runs/<run_id>/ when a new run starts. Everything else in OUT_DIR is the user's."""
from __future__ import annotations

import os

from ._fast import chain as _chain
from .config import Config

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
