"""`heidi doctor`: what this box gives heidi, one line each, and one line per problem found.

Compiled modules, glibc, stage containment, free disk in OUT_DIR, who holds the run, a daemon
serving it, the open-files limit. Reads only; nothing is written to the run.
"""
from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

MIN_FREE_BYTES = 1 << 30         # below this, a stage's output or the journal may fill the disk
MIN_NOFILE = 1024 + 128          # the API's connection cap plus the loop's reserve (daemon/server.py)


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _existing(path: str) -> str:
    """path, or its nearest parent that exists (OUT_DIR may not have been made yet)."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(config: "Config") -> tuple[list[str], list[str]]:
    """(report lines, problems): what `heidi doctor` prints, and the lines that make it exit 1."""
    from ._fast import implementations, no_extensions
    from ._fast._supervise_cgroup import containment
    from .lock import lock_holder

    report: list[str] = []
    problems: list[str] = []
    modules = implementations()
    pure = [name for name, kind in modules.items() if kind != "compiled"]
    report.append("compiled modules: " + ", ".join(f"{name} {kind}" for name, kind in modules.items()))
    if pure and no_extensions():
        report.append("HEIDI_NO_EXTENSIONS is set: the pure-Python twins are used on purpose")
    elif pure:
        problems.append(f"heidi._fast {', '.join(pure)}: running the pure-Python twin (the compiled "
                        "module was not built; install a C compiler and reinstall heidi: "
                        "pip install -e .)")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (ValueError, OSError):
        libc = "unknown (not glibc)"
    report.append(f"C library: {libc}")
    report.append(f"stage containment: {containment().describe()}")

    out = config.out_dir
    where = _existing(out)
    try:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        report.append(f"OUT_DIR {out}: {_gib(free)} free of {_gib(total)}"
                      + ("" if where == out else f" (not made yet; checked {where})"))
        if free < MIN_FREE_BYTES:
            problems.append(f"OUT_DIR {out}: only {_gib(free)} free (heidi wants at least "
                            f"{_gib(MIN_FREE_BYTES)} for the journal, logs and stage outputs)")
    except OSError as exc:
        problems.append(f"OUT_DIR {out}: cannot read its filesystem ({exc.strerror})")
    if os.path.isdir(where) and not os.access(where, os.W_OK | os.X_OK):
        problems.append(f"OUT_DIR {out}: {where} is not writable by this user")

    holder = lock_holder(config.lock_path)
    report.append(f"run lock: held by pid {holder}" if holder else
                  "run lock: free (no heidi process holds the run)")

    daemon = os.path.join(out, "daemon.json")
    try:
        import json
        with open(daemon, "rb") as fh:
            info = json.loads(fh.read())
        pid = int(info.get("pid", 0))
        if pid > 0 and _alive(pid):
            report.append(f"daemon: pid {pid} serving {info.get('url')}")
        else:
            report.append(f"daemon: none (daemon.json names pid {pid}, which is gone; the next "
                          "daemon replaces it)")
    except FileNotFoundError:
        report.append("daemon: none for this OUT_DIR")
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        report.append(f"daemon: {daemon} is unreadable ({exc})")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    def show(n: int) -> str:
        return "unlimited" if n == resource.RLIM_INFINITY else str(n)
    report.append(f"open files (NOFILE): soft {show(soft)}, hard {show(hard)} (heidi raises the "
                  "soft limit to the hard one)")
    if hard != resource.RLIM_INFINITY and hard < MIN_NOFILE:
        problems.append(f"NOFILE hard limit {hard}: below {MIN_NOFILE}, the daemon's API holds "
                        "fewer connections (raise it: LimitNOFILE= in the unit, or ulimit -Hn)")
    return report, problems
