"""The twins cannot drift: for each heidi/_fast module, _X_c and _X_py expose the same public
names and signatures, the selector offers them all, and the `twin` fixture really runs the
package on the twin it names (in this process and in a `python -m heidi` it starts)."""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import orjson
import pytest

import heidi.stages
from heidi._fast import MODULES

from cli_helpers import clean_env


def _compiled(name: str):
    try:
        return importlib.import_module(f"heidi._fast._{name}_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._{name}_c not built: {exc}")


def _shape(obj: object) -> object:
    """What can be compared of a public name: a callable's parameters (name, kind, default) where
    inspect can read them, a class's public methods with theirs; None otherwise."""
    if inspect.isclass(obj):
        return {attr: _shape(getattr(obj, attr)) for attr in dir(obj)
                if not attr.startswith("_") and callable(getattr(obj, attr))}
    if callable(obj):
        try:
            params = inspect.signature(obj).parameters.values()
        except (TypeError, ValueError):
            return None
        return [(p.name, p.kind, p.default) for p in params if p.name != "self"]
    return None


@pytest.mark.parametrize("name", MODULES)
def test_twins_expose_the_same_public_names_and_signatures(name):
    py = importlib.import_module(f"heidi._fast._{name}_py")
    c = _compiled(name)
    assert sorted(c.__all__) == sorted(py.__all__)
    for attr in py.__all__:
        assert hasattr(py, attr) and hasattr(c, attr), attr
        if not callable(getattr(py, attr)):
            if attr != "COMPILED":
                assert getattr(c, attr) == getattr(py, attr), attr  # constants: equal values
            continue
        ours, theirs = _shape(getattr(py, attr)), _shape(getattr(c, attr))
        if inspect.isclass(getattr(py, attr)):
            assert set(theirs) == set(ours), attr
            ours = {k: v for k, v in ours.items() if v is not None and theirs[k] is not None}
            theirs = {k: theirs[k] for k in ours}
        elif ours is None or theirs is None:
            continue  # a builtin or a Cython function without a signature
        assert theirs == ours, attr


@pytest.mark.parametrize("name", MODULES)
def test_selector_offers_every_public_name(name):
    selector = importlib.import_module(f"heidi._fast.{name}")
    py = importlib.import_module(f"heidi._fast._{name}_py")
    missing = [attr for attr in py.__all__ if not hasattr(selector, attr)]
    assert not missing


def test_compiled_twins_really_load_when_required():
    if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") in ("", "0"):
        pytest.skip("HEIDI_REQUIRE_EXTENSIONS is not set")
    for name in MODULES:
        module = importlib.import_module(f"heidi._fast._{name}_c")
        assert module.__file__.endswith(".so"), module.__file__
    env = {k: v for k, v in clean_env().items() if k != "HEIDI_NO_EXTENSIONS"}
    out = subprocess.run([sys.executable, "-m", "heidi", "version", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["modules"] == dict.fromkeys(MODULES, "compiled")


def test_twin_fixture_runs_the_package_on_its_twin(twin):
    from heidi._fast import chain, implementations, redact, supervise
    kind = "compiled" if twin == "c" else "pure-python"
    assert implementations() == dict.fromkeys(MODULES, kind)
    impl = importlib.import_module(f"heidi._fast._supervise_{twin}")
    assert supervise.run_supervised is impl.run_supervised
    # A name imported from a selector at import time follows too.
    assert heidi.stages.run_supervised is impl.run_supervised
    chain_twin = importlib.import_module(f"heidi._fast._chain_{twin}")
    assert chain.verify_stream is chain_twin.verify_stream
    assert redact.Redactor is importlib.import_module(f"heidi._fast._redact_{twin}").Redactor
    out = subprocess.run([sys.executable, "-m", "heidi", "version", "--json"], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = orjson.loads(out.stdout)
    assert info["modules"] == dict.fromkeys(MODULES, kind)
    assert info["no_extensions"] is (twin == "py")
    out = subprocess.run([sys.executable, "-m", "heidi", "version", "--verbose"], env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    switch = "HEIDI_NO_EXTENSIONS is set: the pure-Python twins are used"
    assert (switch in out.stdout.splitlines()) is (twin == "py")
