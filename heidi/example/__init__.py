"""The runnable example pipeline `heidi init DIR` writes: heidi.toml and scripts/02..05 (the
generate stage is heidi's own `heidi generate`, with the offline mock teacher).

The templates are package data files beside this module (heidi/example/heidi.toml and
heidi/example/scripts/*.py), so they are real files that linters and tests see as they ship.
"""
from __future__ import annotations

import os
from importlib.resources import files

from ..errors import UsageError

CONFIG_NAME = "heidi.toml"
SCRIPT_NAMES = ("02_validate_clean.py", "03_unit_test_gate.py",
                "04_train_qlora.py", "05_eval.py")


def _templates() -> list[tuple[str, bytes, int]]:
    """(path relative to the target directory, content, mode) of every file to write."""
    root = files(__name__)
    result = [(CONFIG_NAME, (root / CONFIG_NAME).read_bytes(), 0o644)]
    for name in SCRIPT_NAMES:
        result.append((os.path.join("scripts", name), (root / "scripts" / name).read_bytes(), 0o755))
    return result


def write_example(target_dir: str, force: bool = False) -> list[str]:
    """Write heidi.toml and scripts/ into target_dir (created if missing); returns the paths.

    Without force, an existing target file is refused before anything is written (UsageError).
    """
    templates = _templates()
    targets = [(os.path.join(target_dir, rel), data, mode) for rel, data, mode in templates]
    if not force:
        for path, _, _ in targets:
            if os.path.lexists(path):
                raise UsageError(f"{path} already exists; use heidi init --force to overwrite "
                                 "the example files")
    os.makedirs(os.path.join(target_dir, "scripts"), exist_ok=True)
    written = []
    for path, data, mode in targets:
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        written.append(path)
    return written
