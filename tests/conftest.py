"""Shared fixtures: heidi/_fast tests, and the suites in TWIN_SUITES (journal, machine, verify),
run against both implementations of every _fast module (ids py / c).

`impl_kind` is one session-scoped fixture parametrised over the twins, as in aio-libs multidict's
conftest: pytest runs all tests of one twin, then all of the other. `fast_impl(name)` gives a
test the _X_py or _X_c module itself; `twin` makes the whole package run on that twin for the
test (the selectors heidi._fast.X, and every name a heidi module imported from them), and sets
HEIDI_NO_EXTENSIONS for "py" so that a `python -m heidi` the test starts uses it too.
--no-c-extensions or HEIDI_NO_EXTENSIONS skips the compiled variants; with
HEIDI_REQUIRE_EXTENSIONS (CI) a compiled twin that is missing fails instead of skipping.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import Iterator

import pytest

import heidi
from heidi._fast import MODULES, no_extensions
from heidi.journal_read import LazyModule


def pytest_addoption(parser):
    parser.addoption("--no-c-extensions", action="store_true", default=False,
                     help="skip the compiled (Cython) variants of heidi/_fast tests")


# Suites above heidi/_fast that run on both twins too: every test file whose name starts so
# (test_machine_*.py included).
TWIN_SUITES = ("test_journal", "test_machine", "test_verify")


def pytest_collectstart(collector):
    if isinstance(collector, pytest.Module) and collector.path.stem.startswith(TWIN_SUITES):
        collector.add_marker(pytest.mark.usefixtures("twin"))


def _require_compiled() -> bool:
    # CI sets this: a compiled twin that failed to build must fail the run, not skip.
    return os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0")


def _twin_module(name: str, kind: str) -> ModuleType:
    """heidi._fast._{name}_{kind}; a missing compiled twin skips (fails when required)."""
    try:
        return importlib.import_module(f"heidi._fast._{name}_{kind}")
    except ImportError as exc:
        if kind == "py" or _require_compiled():
            raise
        pytest.skip(f"compiled heidi._fast._{name}_c not built: {exc}")


@pytest.fixture(scope="session", params=["py", "c"])
def impl_kind(request) -> str:
    """'py' or 'c': the twin this test runs against."""
    if request.param == "c":
        if request.config.getoption("--no-c-extensions"):
            pytest.skip("--no-c-extensions")
        if no_extensions() and not _require_compiled():
            pytest.skip("HEIDI_NO_EXTENSIONS: the pure-Python twins only")
    return request.param


_package_loaded = False


def _import_package() -> None:
    # A heidi module first imported while a swap is on would keep the swapped twin's objects
    # after the test: load them all before the first swap.
    global _package_loaded
    if _package_loaded:
        return
    for info in pkgutil.walk_packages(heidi.__path__, "heidi."):
        if info.name != "heidi.__main__" and not info.name.startswith("heidi._fast._"):
            importlib.import_module(info.name)
    _package_loaded = True


def _forget_lazy_lookups() -> None:
    """Empty the LazyModule caches of heidi's modules (journal's `_chain`, say): a name looked
    up through one is a plain attribute from then on, which a twin swap would not reach."""
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "heidi" or modname.startswith("heidi.")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, LazyModule):
                for name in [n for n in vars(value) if n != "_name"]:
                    delattr(value, name)


def _swap(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bind every selector heidi._fast.X to its `kind` twin until monkeypatch undoes it."""
    _import_package()
    replaced: dict[int, tuple[object, object]] = {}
    for name in MODULES:
        selector = importlib.import_module(f"heidi._fast.{name}")
        impl = _twin_module(name, kind)
        for attr in impl.__all__:
            old, new = getattr(selector, attr, None), getattr(impl, attr)
            if old is not None and old is not new:
                monkeypatch.setattr(selector, attr, new)
                if callable(old):
                    replaced[id(old)] = (old, new)
        monkeypatch.setattr(selector, "COMPILED", kind == "c")
    # `from heidi._fast.supervise import run_supervised` (stages.py) bound the selector's
    # object at import: rebind such names too, in every heidi module loaded so far.
    for modname, module in list(sys.modules.items()):
        if module is None or not (modname == "heidi" or modname.startswith("heidi.")):
            continue
        if modname.startswith("heidi._fast."):
            continue
        for attr, value in list(vars(module).items()):
            hit = replaced.get(id(value))
            if hit is not None and hit[0] is value:
                monkeypatch.setattr(module, attr, hit[1])


@pytest.fixture
def twin(impl_kind: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the whole package on impl_kind's twin; returns impl_kind."""
    _forget_lazy_lookups()
    _swap(impl_kind, monkeypatch)
    if impl_kind == "py":
        monkeypatch.setenv("HEIDI_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("HEIDI_NO_EXTENSIONS", raising=False)
    yield impl_kind
    _forget_lazy_lookups()  # names looked up on this twin must not outlive the test


@pytest.fixture
def fast_impl(twin: str):
    """fast_impl('redact') -> the _redact_py or _redact_c module for this test's param (the
    package runs on the same twin meanwhile)."""
    def get(name: str) -> ModuleType:
        return _twin_module(name, twin)
    return get


@pytest.fixture
def clean_heidi_settings(monkeypatch, tmp_path):
    """No heidi setting from the developer's shell, and no stray ./heidi.toml (cwd: tmp_path)."""
    from helpers_loop import ENV_SETTINGS
    for name in ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def server():
    """start(latency_s=0, key=None) -> (FakeLLM, ServerThread): a local OpenAI/Anthropic server on
    127.0.0.1, stopped after the test (tests/fake_llm.py; aiohttp is imported only here)."""
    from fake_llm import FakeLLM, ServerThread
    started = []

    def start(latency_s: float = 0.0, key: str | None = None) -> tuple[FakeLLM, ServerThread]:
        fake = FakeLLM(latency_s, key)
        thread = ServerThread(fake)
        started.append(thread)
        return fake, thread
    yield start
    for thread in started:
        thread.stop()
