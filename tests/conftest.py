"""Shared fixtures: every heidi/_fast test runs against both implementations (ids py / c)."""
from __future__ import annotations

import importlib
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--no-c-extensions", action="store_true", default=False,
                     help="skip the compiled (Cython) variants of heidi/_fast tests")


def _require_compiled() -> bool:
    # CI sets this: a compiled twin that failed to build must fail the run, not skip.
    return os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0")


@pytest.fixture(params=["py", "c"])
def impl_kind(request):
    """'py' or 'c'; use with fast_impl(name) to get the module under test."""
    if request.param == "c" and request.config.getoption("--no-c-extensions"):
        pytest.skip("--no-c-extensions")
    return request.param


@pytest.fixture
def fast_impl(impl_kind):
    """fast_impl('redact') -> the _redact_py or _redact_c module for this test's param."""
    def get(name: str):
        if impl_kind == "py":
            return importlib.import_module(f"heidi._fast._{name}_py")
        try:
            return importlib.import_module(f"heidi._fast._{name}_c")
        except ImportError as exc:
            if _require_compiled():
                raise
            pytest.skip(f"compiled heidi._fast._{name}_c not built: {exc}")
    return get


@pytest.fixture
def clean_heidi_settings(monkeypatch, tmp_path):
    """No heidi setting from the developer's shell, and no stray ./heidi.toml (cwd: tmp_path)."""
    from helpers_loop import ENV_SETTINGS
    for name in ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
