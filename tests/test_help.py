"""First steps a new user takes: `--help` that describes every command and option (and lists the
exit codes), `heidi doctor`, the notice when the compiled modules are missing, `--out-dir`
naming a file, `heidi init .`."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from cli_helpers import ROOT, clean_env, heidi_cli
from heidi.cli_parser import build_parser

NOTICE = "running the pure-Python modules"


def _walk(parser: argparse.ArgumentParser, path: str = "heidi"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", "(the command)", described.get(name)
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_option_has_a_description():
    missing = [f"{where}: {what}" for where, what, help_ in _walk(build_parser())
               if not help_ or help_ == argparse.SUPPRESS]
    assert missing == []
    commands = {where.split()[1] for where, _, _ in _walk(build_parser()) if " " in where}
    assert {"start", "tick", "run", "status", "doctor", "daemon", "init", "version"} <= commands


def test_help_lists_exit_codes_and_points_to_the_configuration():
    proc = heidi_cli("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for text in ("exit codes:", "75", "128+N", "Configuration", "heidi COMMAND --help"):
        assert text in proc.stdout
    # the commands parsed by hand for start-up speed still send --help to argparse
    for command in ("status", "tick"):
        proc = heidi_cli(command, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: heidi {command}")
    assert "--watch" in heidi_cli("status", "-h").stdout


def test_doctor_reports_the_box_and_exits_0_when_all_is_fine(tmp_path):
    proc = heidi_cli("doctor", "--out-dir", str(tmp_path / "run"))
    lines = proc.stdout.splitlines()
    for start in ("compiled modules:", "C library:", "stage containment:", "OUT_DIR ", "run lock:",
                  "daemon:", "open files (NOFILE):"):
        assert any(line.startswith(start) for line in lines), (start, proc.stdout)
    problems = [line for line in proc.stderr.splitlines() if line.startswith("problem:")]
    assert proc.returncode == (1 if problems else 0)
    assert len(proc.stderr.splitlines()) == len(problems)  # one line per problem, nothing else
    assert not (tmp_path / "run").exists()  # doctor only reads


@pytest.fixture
def uncompiled(tmp_path):
    """heidi as a build without a C compiler leaves it: the package without its extensions."""
    pkg = tmp_path / "nocc"
    shutil.copytree(os.path.join(ROOT, "heidi"), pkg / "heidi",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = clean_env()
    env.pop("HEIDI_NO_EXTENSIONS", None)
    env["PYTHONPATH"] = str(pkg)
    return env


def _run(env, *args):
    return subprocess.run([sys.executable, "-m", "heidi", *args], capture_output=True, text=True,
                          env=env, cwd=str(os.path.dirname(env["PYTHONPATH"])), timeout=60)


def test_a_build_without_compiled_modules_says_so(uncompiled, tmp_path):
    for args in (("version",), ("status", "--out-dir", str(tmp_path / "run"))):
        proc = _run(uncompiled, *args)
        assert proc.returncode == 0 and proc.stderr.count("\n") == 1 and NOTICE in proc.stderr
    proc = _run(uncompiled, "doctor", "--out-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert any(line.startswith("problem: heidi._fast chain, redact, atomic, supervise, procstat")
               for line in proc.stderr.splitlines())
    # asked for: no notice, no problem for it
    asked = {**uncompiled, "HEIDI_NO_EXTENSIONS": "1"}
    assert NOTICE not in _run(asked, "version").stderr
    assert "heidi._fast" not in _run(asked, "doctor", "--out-dir", str(tmp_path / "run")).stderr


def test_compiled_modules_print_no_notice(tmp_path):
    from heidi._fast import atomic
    if not atomic.COMPILED:
        pytest.skip("the compiled modules are not built here")
    env = {k: v for k, v in clean_env().items() if k != "HEIDI_NO_EXTENSIONS"}
    proc = subprocess.run([sys.executable, "-m", "heidi", "version"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""


def test_out_dir_naming_a_file_is_exit_2_naming_out_dir(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("mine\n")
    for args in (("status",), ("start",), ("run",), ("tick",)):
        proc = heidi_cli(*args, "--out-dir", str(target))
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "OUT_DIR" in proc.stderr and "not a directory" in proc.stderr
    assert target.read_text() == "mine\n"


def test_init_prints_the_command_that_runs_it(tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    proc = subprocess.run([sys.executable, "-m", "heidi", "init", "."], capture_output=True,
                          text=True, env=clean_env(), cwd=str(here), timeout=60)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("run it with: heidi run")
    proc = subprocess.run([sys.executable, "-m", "heidi", "init", "my demo"], capture_output=True,
                          text=True, env=clean_env(), cwd=str(here), timeout=60)
    assert proc.stdout.rstrip().endswith("run it with: cd 'my demo' && heidi run")
