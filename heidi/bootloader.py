"""The one-file frozen heidi is a child of PyInstaller's bootloader, the process cron, systemd or
the user started. If the bootloader dies, even by SIGKILL, the kernel sends this process SIGTERM,
and heidi behaves as on any SIGTERM: the stage ends, the lock is released, the run is resumable."""
from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def onefile_child() -> bool:
    """True in the one-file build's real heidi: frozen, and unpacked away from the executable
    (a one-folder build's files sit beside it, or in its _internal/)."""
    if not getattr(sys, "frozen", False):
        return False
    unpacked = getattr(sys, "_MEIPASS", None)
    if not unpacked:
        return False
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    real = os.path.realpath(unpacked)
    return not (real == exe_dir or real.startswith(exe_dir + os.sep))


def _runs_this_binary(pid: int) -> bool | None:
    """Whether pid runs the same executable as this process (None: cannot tell)."""
    try:
        return os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(sys.executable)
    except OSError:
        return None


def die_with_bootloader() -> bool:
    """In the one-file build on Linux: ask for SIGTERM when the bootloader dies. True if set.

    The bootloader may already be gone before the request takes effect (then no signal would
    ever come): if the parent is no longer a process of this binary, act on SIGTERM at once."""
    if not sys.platform.startswith("linux") or not onefile_child():
        return False
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or _runs_this_binary(parent) is False:
        os.kill(os.getpid(), signal.SIGTERM)  # nothing is held yet: ends the process
    return True
