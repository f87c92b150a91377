"""The build: without a working compiler, or with HEIDI_NO_EXTENSIONS=1, setup.py still succeeds,
says so, and heidi runs on the pure-Python twins."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("Cython", reason="the build tests need Cython (pip install -e '.[test]')")


@pytest.fixture
def source(tmp_path):
    """A copy of the sources without any compiled module."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "heidi"), tmp_path / "heidi",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    return tmp_path


def _build(source, **env):
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=str(source), capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items()
                                  if k != "HEIDI_NO_EXTENSIONS"}, **env})


def _implementations(source) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HEIDI_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(source)
    out = subprocess.run([sys.executable, "-m", "heidi", "version", "--json"], cwd=str(source),
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return orjson.loads(out.stdout)["modules"]


def test_missing_compiler_falls_back_with_a_notice(source):
    res = _build(source, CC="/bin/false")
    assert res.returncode == 0, res.stderr
    assert "could not compile heidi._fast._chain_c" in res.stderr
    assert "using the pure-Python twins" in res.stderr
    assert not list(source.glob("heidi/_fast/*.so"))
    assert set(_implementations(source).values()) == {"pure-python"}


def test_no_extensions_at_build_time(source):
    res = _build(source, HEIDI_NO_EXTENSIONS="1")
    assert res.returncode == 0, res.stderr
    assert "HEIDI_NO_EXTENSIONS set: building pure-Python twins only" in res.stderr
    assert "Cythonizing" not in res.stdout + res.stderr
    assert not list(source.glob("heidi/_fast/*.so"))
    assert set(_implementations(source).values()) == {"pure-python"}
