"""Every module imports on its own in a fresh interpreter (catches import cycles; PyInstaller needs
it), the package's module-level imports form a tree (no circle, config/clock/errors at the bottom,
cli at the top, no private name imported across modules), and `heidi version --verbose` tells
truthfully which _fast modules are compiled."""
from __future__ import annotations

import ast
import glob
import importlib.machinery
import os
import re
import subprocess
import sys

import orjson
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "heidi")
FAST = os.path.join(PKG, "_fast")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEIDI_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _require_compiled() -> bool:
    return os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0")


def _python_modules() -> list[str]:
    """heidi.* modules from .py files, in every package directory (not build/ leftovers)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.exists(os.path.join(dirpath, d, "__init__.py")))
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            mod = name[:-3]
            names.append(rel if mod == "__init__" else f"{rel}.{mod}")
    return names


def _compiled_modules() -> list[str]:
    """heidi._fast._X_c extensions built in place."""
    names = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in glob.glob(os.path.join(FAST, "*" + suffix)):
            names.add("heidi._fast." + os.path.basename(path).split(".", 1)[0])
    return sorted(names)


def _selectors() -> list[str]:
    """_fast modules that have a selector (chain.py, redact.py, ...)."""
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(FAST, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def _has_compiled(name: str) -> bool:
    return f"heidi._fast._{name}_c" in _compiled_modules()


def _pyx_twins() -> list[str]:
    return sorted(os.path.basename(p)[1:-len("_c.pyx")]
                  for p in glob.glob(os.path.join(FAST, "_*_c.pyx")))


def test_module_list_is_complete():
    modules = _python_modules()
    for expected in ("heidi", "heidi.__main__", "heidi.cli", "heidi.journal", "heidi._fast",
                     "heidi._fast.chain", "heidi._fast._chain_py", "heidi._fast._atomic_py"):
        assert expected in modules
    assert not any(".build" in m for m in modules)


@pytest.mark.parametrize("module", [m for m in _python_modules() if m != "heidi.__main__"]
                         + _compiled_modules())
def test_module_imports_alone(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, env=_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def _module_path(module: str) -> str:
    base = os.path.join(ROOT, *module.split("."))
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def _import_time_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run when the module is imported: not function bodies, not TYPE_CHECKING."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name != "TYPE_CHECKING":
                out += _import_time_statements(node.body)
            out += _import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out += _import_time_statements(part)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            out += _import_time_statements(node.body)
        else:
            out.append(node)
    return out


def _imports(module: str, modules: set[str]) -> list[tuple[str, str]]:
    """(heidi module imported, name taken from it or "") for every import-time import of module."""
    with open(_module_path(module), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    package = module if _module_path(module).endswith("__init__.py") else module.rpartition(".")[0]
    found: list[tuple[str, str]] = []
    for node in _import_time_statements(tree.body):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "heidi"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "heidi":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if sub in modules else (base, alias.name))
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = set(_python_modules())
    return {m: {dep for dep, _ in _imports(m, modules) if dep in modules and dep != m}
            for m in modules}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep in on_path:
                return path[path.index(dep):] + [dep]
            if dep not in done:
                found = visit(dep)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    graph = _import_graph()
    assert {"heidi.machine", "heidi.stages", "heidi.loop"} <= set(graph)
    assert "heidi.loop" in graph["heidi.stages"]  # the graph sees relative imports
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_imports_form_layers():
    """errors at the bottom, then clock and config (with settings); the pure loop only above them; nothing but
    __main__ imports the CLI."""
    graph = _import_graph()
    assert graph["heidi.errors"] == set()
    assert graph["heidi.clock"] <= {"heidi.errors"}
    assert graph["heidi.settings"] <= {"heidi.errors"}  # config's table and parsers
    assert graph["heidi.config"] <= {"heidi.errors", "heidi.settings"}
    assert graph["heidi.loop"] <= {"heidi.errors", "heidi.clock", "heidi.config", "heidi.settings"}
    assert graph["heidi.stages"].isdisjoint({"heidi.machine", "heidi.core"})
    assert [m for m, deps in graph.items() if "heidi.cli" in deps] == ["heidi.__main__"]


def test_no_private_name_imported_across_modules():
    modules = set(_python_modules())
    private = [f"{m} imports {name} from {dep}" for m in sorted(modules)
               for dep, name in _imports(m, modules)
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_main_module_alone_runs_cli():
    result = subprocess.run([sys.executable, "-m", "heidi", "version"], capture_output=True,
                            text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("heidi ")


def _version_verbose(**env: str) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "heidi", "version", "--verbose"],
                            capture_output=True, text=True, env=_env(**env), timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = {}
    for line in result.stdout.splitlines():
        if line.startswith("heidi._fast."):
            name, _, kind = line[len("heidi._fast."):].partition(": ")
            kinds[name] = kind
    return kinds


def test_version_verbose_lists_every_fast_module_compiled():
    kinds = _version_verbose()
    expected = {name: "compiled" if _has_compiled(name) else "pure-python"
                for name in _selectors()}
    assert kinds == expected
    assert {"chain", "atomic"} <= set(kinds)


def test_version_verbose_pure_python_when_disabled():
    kinds = _version_verbose(HEIDI_NO_EXTENSIONS="1")
    assert kinds == dict.fromkeys(_selectors(), "pure-python")


def test_version_json_modules():
    result = subprocess.run([sys.executable, "-m", "heidi", "version", "--json"],
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    info = orjson.loads(result.stdout)
    assert info["modules"] == {name: "compiled" if _has_compiled(name) else "pure-python"
                               for name in _selectors()}


def test_compiled_modules_really_load():
    """Where a compiled twin is importable, the selector uses it (COMPILED is True); with
    HEIDI_REQUIRE_EXTENSIONS set (CI), every .pyx twin must be built and loaded."""
    twins = [name for name in _pyx_twins() if name in _selectors()]
    assert "chain" in twins and "atomic" in twins
    script = (
        "import importlib, json\n"
        f"out = {{}}\n"
        f"for name in {twins!r}:\n"
        "    try:\n"
        "        importlib.import_module(f'heidi._fast._{name}_c')\n"
        "        importable = True\n"
        "    except ImportError:\n"
        "        importable = False\n"
        "    sel = importlib.import_module(f'heidi._fast.{name}')\n"
        "    out[name] = [importable, sel.COMPILED]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    status = orjson.loads(result.stdout)
    for name, (importable, compiled) in status.items():
        if _require_compiled():
            assert importable, f"heidi._fast._{name}_c is not built"
        assert compiled is importable, name
    # the one the brief singles out
    chain_importable, chain_compiled = status["chain"]
    if chain_importable:
        assert chain_compiled is True
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=_env(HEIDI_NO_EXTENSIONS="1"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert all(compiled is False for _, compiled in orjson.loads(result.stdout).values())


def test_compiled_chain_in_this_process():
    try:
        importlib.import_module("heidi._fast._chain_c")
    except ImportError:
        if _require_compiled():
            raise
        pytest.skip("compiled chain not built")
    from heidi._fast import chain
    if os.environ.get("HEIDI_NO_EXTENSIONS", "") not in ("", "0"):
        assert chain.COMPILED is False
    else:
        assert chain.COMPILED is True
        assert chain.verify_stream.__module__ == "heidi._fast._chain_c"


def test_cli_modes_match_the_config():
    """The CLI keeps its own copy of the modes so that parsing does not load the config."""
    from heidi import cli, config
    assert cli.MODES == config.MODES


def test_readme_names_every_module():
    """README's "How it works" table names each module of the package and its job."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as fh:
        listed = set(re.findall(r"^\| `(heidi/[\w/]+\.py)` \|", fh.read(), re.M))
    # a twin pair and its shared data are named by their selector's row; so are the supervise
    # selector's core and watchdog
    by_selector = re.compile(r"heidi/_fast/(_\w+_(c|py|types|rules)|__init__|_supervise_core"
                             r"|_supervise_watchdog)\.py$")
    missing = []
    for dirpath, _, names in os.walk(os.path.join(root, "heidi")):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if (name.endswith(".py") and "/example/" not in rel and name != "_version.py"
                    and not by_selector.search(rel) and rel not in listed):
                missing.append(rel)
    assert sorted(missing) == [], f"README's module table does not name {sorted(missing)}"
