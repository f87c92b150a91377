"""The compiled supervise twin on a C library without posix_spawn's closefrom (glibc < 2.34) or
chdir (< 2.29) file actions, as the portable binary meets on older boxes: it looks them up when it
loads, and without them a stage still gets its cwd and none of heidi's file descriptors."""
from __future__ import annotations

import importlib
import os
import sys

import pytest

PY = sys.executable


def _compiled():
    try:
        return importlib.import_module("heidi._fast._supervise_c")
    except ImportError as exc:
        # CI sets this (as conftest's fixtures read it): a failed build fails, not skips.
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._supervise_c not built: {exc}")


@pytest.fixture(params=["newer-libc", "older-libc"])
def sup(request):
    """The compiled twin with the file actions looked up (this box) or acting as if absent."""
    if request.config.getoption("--no-c-extensions"):
        pytest.skip("--no-c-extensions")
    mod = _compiled()
    features = mod._use_spawn_features(request.param == "newer-libc",
                                       request.param == "newer-libc")
    assert features == {"closefrom": False, "chdir": False} or request.param == "newer-libc"
    yield mod
    mod._use_spawn_features(True, True)


class Collect:
    def __init__(self) -> None:
        self.data = b""

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk


def _glibc() -> tuple[int, ...]:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    assert name == "glibc"
    return tuple(int(x) for x in version.split(".")[:2])


def test_features_follow_the_running_c_library():
    mod = _compiled()
    try:
        assert mod._spawn_features() == {"closefrom": _glibc() >= (2, 34),
                                         "chdir": _glibc() >= (2, 29)}
        assert mod._use_spawn_features(False, False) == {"closefrom": False, "chdir": False}
    finally:
        assert mod._use_spawn_features(True, True) == {"closefrom": _glibc() >= (2, 34),
                                                       "chdir": _glibc() >= (2, 29)}


@pytest.mark.parametrize("with_cwd", [False, True], ids=["spawn", "spawn-with-cwd"])
def test_stage_gets_no_fd_of_heidi(sup, tmp_path, with_cwd):
    r_fd, w_fd = os.pipe()
    os.set_inheritable(r_fd, True)  # an fd a careless library left inheritable
    os.set_inheritable(w_fd, True)
    try:
        code = ("import os, sys\n"
                f"for fd in ({r_fd}, {w_fd}):\n"
                "    try: os.fstat(fd); print(fd, 'open')\n"
                "    except OSError: print(fd, 'closed')\n"
                "print(os.getcwd())")
        out = Collect()
        r = sup.run_supervised([PY, "-c", code], on_output=out,
                               cwd=str(tmp_path) if with_cwd else None)
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert r.ok, r.describe()
    lines = out.data.decode().splitlines()
    assert lines[:2] == [f"{r_fd} closed", f"{w_fd} closed"]
    assert lines[2] == (str(tmp_path) if with_cwd else os.getcwd())


def test_bad_cwd_is_the_same_spawn_error(sup, tmp_path):
    r = sup.run_supervised(["true"], cwd=str(tmp_path / "nope"))
    assert r.spawn_error == f"cannot change directory to '{tmp_path / 'nope'}': " \
                            "No such file or directory"
