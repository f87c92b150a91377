"""packaging/glibc_check.py: the newest GLIBC_ version an ELF file needs, read from small shared
objects compiled here with gcc, from folders, and from inside a PyInstaller one-file archive."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "packaging", "glibc_check.py")

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="symbol versions below are x86_64 glibc's")


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture(scope="module")
def elf_226(tmp_path_factory) -> str:
    """A shared object whose newest need is reallocarray@GLIBC_2.26 (memcpy is 2.14)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("elf")
    src = d / "lib.c"
    src.write_text("#define _GNU_SOURCE\n#include <stdlib.h>\n#include <string.h>\n"
                   "void *grow(void *p, size_t n, void *q) {\n"
                   "  p = reallocarray(p, n, 8); memcpy(p, q, n); return p; }\n")
    out = d / "libgrow.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(out), str(src)], check=True,
                   timeout=120)
    return str(out)


def test_reports_the_newest_version_a_file_needs(elf_226):
    r = _check(elf_226)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"GLIBC_2.26         {elf_226}",
        f"highest glibc needed: GLIBC_2.26 ({elf_226}; 1 ELF files)"]


def test_max_fails_naming_the_file_and_its_symbols(elf_226):
    r = _check("--max", "2.25", elf_226)
    assert r.returncode == 1
    assert r.stderr == f"glibc_check.py: {elf_226} needs GLIBC_2.26 > GLIBC_2.25 for reallocarray\n"
    assert _check("--max", "2.26", elf_226).returncode == 0
    assert _check("--max", "2.31", elf_226).returncode == 0


def test_folder_lists_each_elf_and_skips_other_files(elf_226, tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(elf_226, tmp_path / "sub" / "a.so")
    shutil.copy(CHECK, tmp_path / "not-elf.py")
    os.symlink("sub/a.so", tmp_path / "link.so")  # a link is the file it points to: once
    r = _check("--summary", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"highest glibc needed: GLIBC_2.26 ({tmp_path}/sub/a.so; 1 ELF files)\n"


def test_the_elf_files_inside_a_onefile_archive(elf_226, tmp_path):
    writers = pytest.importorskip("PyInstaller.archive.writers")
    archive = tmp_path / "pkg"
    text = tmp_path / "data.txt"
    text.write_text("not an ELF\n" * 100)
    writers.CArchiveWriter(str(archive), [("libgrow.so", elf_226, True, "b"),
                                          ("raw.so", elf_226, False, "b"),
                                          ("data.txt", str(text), True, "x")],
                           "libpython3.11.so.1.0")
    # A one-file binary is its bootloader with the archive appended: here the .so plays both.
    onefile = tmp_path / "heidi"
    with open(elf_226, "rb") as f:
        onefile.write_bytes(f.read() + archive.read_bytes())
    r = _check(str(onefile))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:3] == [f"GLIBC_2.26         {onefile}",
                                         f"GLIBC_2.26         {onefile}!libgrow.so",
                                         f"GLIBC_2.26         {onefile}!raw.so"]


def test_the_venv_own_extensions_parse(tmp_path):
    """Real-world files: the interpreter's own extension modules all parse, each with a need."""
    import _ctypes  # an extension module that links libc and libffi
    r = _check(_ctypes.__file__)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("GLIBC_2.")


@pytest.mark.parametrize("args, message", [
    (["--max", "two", "."], "glibc_check.py: --max 'two' is not a glibc version; accepted: X.Y like 2.31\n"),
    (["/nonexistent-heidi"], "glibc_check.py: /nonexistent-heidi: no such file or folder\n"),
])
def test_bad_usage_is_exit_2(args, message):
    r = _check(*args)
    assert (r.returncode, r.stderr) == (2, message)


def test_no_elf_is_exit_2(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    r = _check(str(tmp_path))
    assert (r.returncode, r.stderr) == (2, f"glibc_check.py: no ELF file under {tmp_path}\n")
