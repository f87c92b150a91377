"""Resource limits (the walkthrough's RLimit): applied to heidi at start-up, inherited by stages.

Address space (HEIDI_MAX_MEMORY_MB) is off by default: CUDA jobs reserve far more virtual
memory than they use, and a limit on it kills them at start-up. Without HEIDI_MAX_FDS the soft
NOFILE limit is raised to the hard one, so the daemon's API and the stage's pipes have room.
"""
from __future__ import annotations

import resource

from .config import Config
from .errors import ConfigError


def wanted_limits(cfg: Config) -> dict[int, tuple[str, int]]:
    """RLIMIT_* -> (variable name, value) for every limit the configuration sets."""
    wanted = {}
    if cfg.max_fds is not None:
        wanted[resource.RLIMIT_NOFILE] = ("HEIDI_MAX_FDS", cfg.max_fds)
    if cfg.max_cpu_s is not None:
        wanted[resource.RLIMIT_CPU] = ("HEIDI_MAX_CPU_S", cfg.max_cpu_s)
    if cfg.max_memory_mb is not None:
        wanted[resource.RLIMIT_AS] = ("HEIDI_MAX_MEMORY_MB", cfg.max_memory_mb * 1024 * 1024)
    return wanted


def apply_limits(cfg: Config) -> dict[int, tuple[int, int]]:
    """Set soft and hard limits to the configured values (returned); unset ones are left as they
    are, but for the soft NOFILE limit, raised to the hard one."""
    applied = {}
    for which, (name, value) in wanted_limits(cfg).items():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            raise ConfigError(f"{name}={value if name != 'HEIDI_MAX_MEMORY_MB' else cfg.max_memory_mb}: "
                              f"above this process's hard limit ({hard}); must be at most that")
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{name}: cannot apply the limit ({exc})") from None
        applied[which] = (value, value)
    if resource.RLIMIT_NOFILE not in applied:
        raise_nofile()
    return applied


def raise_nofile() -> tuple[int, int] | None:
    """Soft RLIMIT_NOFILE up to the hard one (the usual soft 1024 is a select() relic); the new
    (soft, hard), or None when it is already there or cannot move (never an error)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # the kernel refuses an infinite NOFILE; fs.nr_open is the real ceiling
        try:
            with open("/proc/sys/fs/nr_open", "rb") as fh:
                target = int(fh.read().strip())
        except (OSError, ValueError):
            return None
    if soft != resource.RLIM_INFINITY and soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return None
    return target, hard
