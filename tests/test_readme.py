"""README's commands run as written on a fresh clone: every ```sh block (but those marked
`<!-- not run: why -->` on the line before: root, systemd, a real API key, minutes of building)
runs in a copy of this checkout's files, in order; the Python API snippet runs with the Python
the set-up installed; the heidi.toml example loads; the cron lines match
packaging/crontab.example and use absolute paths."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from cli_helpers import ROOT
from heidi.config import Config

README = os.path.join(ROOT, "README.md")
NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, text, why not run) of every fenced block in README."""
    found = []
    lines = open(README, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group(1)
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        why = NOT_RUN.match(before)
        end = lines.index("```", i + 1)
        found.append((start + 1, lang, "\n".join(lines[i + 1:end]) + "\n", why and why.group(1)))
        i = end + 1
    return found


def test_every_block_is_run_or_says_why_not():
    langs = {lang for _, lang, _, _ in blocks()}
    assert langs <= {"sh", "python", "toml", "crontab"}, langs  # each kind has a check below
    assert not any(NOT_RUN.match(line) is None and line.startswith("<!-- not run")
                   for line in open(README, encoding="utf-8").read().split("\n"))
    # an indented code block would escape the test: every command is fenced
    text = open(README, encoding="utf-8").read()
    assert not re.search(r"^    (heidi|curl|python3?|\.venv/) ", text, re.M)


def test_the_cron_lines_use_absolute_paths_and_match_the_example():
    cron = [text for _, lang, text, _ in blocks() if lang == "crontab"]
    assert len(cron) == 1
    lines = [ln for ln in cron[0].splitlines() if ln.strip()]
    example = [ln for ln in open(os.path.join(ROOT, "packaging", "crontab.example")).read().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert lines == example
    assert any(ln.startswith("PATH=/") for ln in lines)
    assert any(ln.startswith("HEIDI_PYTHON=/") for ln in lines)
    job = [ln for ln in lines if ln.startswith("*")][0]
    assert job.split()[5].startswith("/")  # the command: an absolute path


def test_the_toml_example_is_a_valid_heidi_toml(tmp_path):
    for _, lang, text, why in blocks():
        if lang != "toml" or why:
            continue
        path = tmp_path / "heidi.toml"
        path.write_text(text)
        cfg = Config.load(str(path), environ={})
        assert cfg.rounds >= 1


def _fresh_clone(dest: str) -> None:
    """This checkout's files as a clone would have them: tracked and new, nothing ignored (no
    build, no compiled module, no venv)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no fresh clone to make")
    for rel in listed.stdout.decode().split("\0"):
        if not rel or not os.path.isfile(os.path.join(ROOT, rel)):
            continue
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def test_readme_commands_run_as_written_on_a_fresh_clone(tmp_path):
    if shutil.which("python3") is None:
        pytest.skip("no python3 on PATH")
    clone = tmp_path / "heidi"
    _fresh_clone(str(clone))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HEIDI_", "RUN_", "OUT_DIR", "VIRTUAL_ENV", "PYTHON"))}
    # a busy CI box must not hold the example's real stages for the governor
    env.update(MAX_CPU_PCT="100", MAX_MEM_PCT="100")
    ran = []
    for line, lang, text, why in blocks():
        if why is not None or lang not in ("sh", "python"):
            continue
        if lang == "sh":
            argv = ["bash", "-e", "-c", text]
        else:
            python = clone / ".venv" / "bin" / "python"
            assert python.exists(), "the set-up block should have made .venv"
            argv = [str(python), "-c", text]
        proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert proc.returncode == 0, (f"README line {line} ({lang}) failed, exit {proc.returncode}:\n"
                                      f"{text}\n--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n"
                                      f"{proc.stderr[-3000:]}")
        ran.append((line, proc))
    assert len(ran) >= 3  # the set-up, the example pipeline, the Python API
    # the demo line ran heidi from the venv the set-up made: the example completed
    demo = [p for _, p in ran if "heidi init demo" in p.args[-1]]
    assert demo and "completed" in demo[0].stdout
    notices = "".join(p.stderr for _, p in ran)
    assert "running the pure-Python modules" not in notices or not shutil.which("cc")
