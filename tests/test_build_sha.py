"""The compiled chain module built without OpenSSL (HEIDI_NO_OPENSSL=1, as where libcrypto's
headers are missing) hashes with its portable SHA-256 and verifies exactly as the pure twin."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("Cython", reason="the build tests need Cython (pip install -e '.[test]')")

CHECK = r"""
import hashlib, io, random
from heidi._fast import _chain_c, _chain_py
assert _chain_c.SHA256_IMPL == "portable", _chain_c.SHA256_IMPL
rng = random.Random(5)
prev, lines = "run_x", []
for i in range(300):
    msg = "".join(rng.choice("ab \"\\é𝄞\n") for _ in range(rng.randrange(0, 300)))
    line = _chain_py.encode_event("2026-02-20T07:45:38.307Z", "run_x", 1, "train", "info", "x",
                                  msg, {}, {"cpu": rng.random()}, [], None, prev)
    lines.append(line)
    prev = hashlib.sha256(line).hexdigest()
data = b"".join(lines)
assert (_chain_c.verify_stream(io.BytesIO(data)) == _chain_py.verify_stream(io.BytesIO(data))
        == (300, prev, "run_x"))
bad = data.replace(lines[100], lines[100].replace(b'"info"', b'"warn"'))
def answer(m):
    try:
        return m.verify_stream(io.BytesIO(bad))
    except m.JournalError as exc:
        return exc.line_no, exc.reason
assert answer(_chain_c) == answer(_chain_py) and answer(_chain_c)[0] == 102
print("ok")
"""


def test_portable_sha256_build(tmp_path):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "heidi"), tmp_path / "heidi",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for pyx in glob.glob(str(tmp_path / "heidi" / "_fast" / "_*_c.pyx")):
        if not pyx.endswith("_chain_c.pyx"):
            os.unlink(pyx)  # only the module under test: a faster build
    # Like test_build's builds, this one ignores a HEIDI_NO_EXTENSIONS of the test run (CI's
    # pure-twin run): the module under test is the compiled one.
    env = {k: v for k, v in os.environ.items() if k != "HEIDI_NO_EXTENSIONS"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                           env={**env, "HEIDI_NO_OPENSSL": "1"})
    assert build.returncode == 0, build.stderr
    assert glob.glob(str(tmp_path / "heidi" / "_fast" / "_chain_c*.so")), build.stderr
    run = subprocess.run([sys.executable, "-c", CHECK], cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(tmp_path)})
    assert (run.returncode, run.stdout.strip()) == (0, "ok"), run.stderr
