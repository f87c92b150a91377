"""Running `python -m heidi` from tests: a clean environment and an empty working directory."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CWD: list[str] = []


def clean_env(**extra: str) -> dict:
    """os.environ without heidi's settings (HEIDI_NO_EXTENSIONS, which picks the twins, is kept),
    with this checkout importable, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEIDI_", "RUN_", "OUT_DIR")) or k == "HEIDI_NO_EXTENSIONS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def empty_cwd() -> str:
    """An empty directory, so no stray ./heidi.toml changes the CLI's settings."""
    if not _CWD:
        _CWD.append(tempfile.mkdtemp(prefix="heidi-cwd-"))
        atexit.register(shutil.rmtree, _CWD[0], True)
    return _CWD[0]


def heidi_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heidi", *args], capture_output=True, text=True,
                          env=clean_env(**env), cwd=empty_cwd(), timeout=60)
