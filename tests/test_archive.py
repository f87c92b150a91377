"""Archiving a finished run moves what the run owns -- read from its journal -- and nothing else:
a user's files in a shared OUT_DIR stay byte for byte, even a data/ or logs/ folder of their own
or a journal line that names them. OUT_DIR may not be / or the home directory itself."""
from __future__ import annotations

import hashlib
import os

import pytest

from heidi.config import Config
from heidi.errors import ConfigError
from heidi.journal import JournalWriter, read_events, verify_run
from heidi.loop import StageOutcome
from heidi.archive import owned_paths
from heidi.machine import Machine, mock_stage

from cli_helpers import heidi_cli
from helpers_loop import check_run, make_config

pytestmark = pytest.mark.usefixtures("clean_heidi_settings")


def fake_stage(ctx, stage, round_):
    """Writes what a real stage of the example would (its --output), inside the directories heidi
    made for it, and reports it as script_success does."""
    cfg = ctx.config
    outcome = mock_stage(ctx, stage, round_)
    rel = {"generate": f"data/raw_round_{round_}.jsonl", "validate": f"data/clean_round_{round_}.jsonl",
           "train": f"out_lora_round_{round_}", "eval": f"eval/report_round_{round_}.json"}[stage]
    path = os.path.join(cfg.out_dir, rel)
    if stage == "train":
        os.makedirs(os.path.join(path, "final"))
        path = os.path.join(path, "final", "adapter.json")
    with open(path, "w") as fh:
        fh.write(f"{stage} {round_}\n")
    with open(os.path.join(cfg.logs_dir, f"round_{round_}", f"{stage}.log"), "w") as fh:
        fh.write("log\n")
    outcome.artifact_paths = [rel]
    return outcome


def snapshot(root: str, skip: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file (and the target of every symlink) under root, but the skipped tops."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel_dir == "." and name in skip:
                continue
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            else:
                with open(path, "rb") as fh:
                    found[rel] = hashlib.sha256(fh.read()).hexdigest()
        found.update({os.path.normpath(os.path.join(rel_dir, d)) + "/": "dir" for d in dirnames})
    return found


def user_files(out: str) -> None:
    """A shared OUT_DIR: config, scripts, notes, keys, and data/ + logs/ folders of the user's."""
    os.makedirs(os.path.join(out, "scripts"))
    os.makedirs(os.path.join(out, ".ssh"), mode=0o700)
    os.makedirs(os.path.join(out, "data", "mine"))
    for rel, text in {"heidi.toml": "rounds = 2\n", "NOTES.md": "# notes\n",
                      "scripts/01_teacher_generate.py": "print()\n", ".ssh/id_ed25519": "KEY\n",
                      "data/own.jsonl": "{}\n", "data/mine/a.txt": "a\n"}.items():
        with open(os.path.join(out, rel), "w") as fh:
            fh.write(text)
    os.symlink("NOTES.md", os.path.join(out, "notes-link"))


def real_config(tmp_path, **overrides) -> Config:
    """Not mock mode (stage_start records what the stage owns), with a stage runner of our own."""
    return make_config(tmp_path, HEIDI_MOCK_SUBPROCESSES=False, **overrides)


def run_to_end(cfg: Config) -> str:
    with Machine(cfg, stage_runner=fake_stage) as machine:
        machine.start()
        while machine.tick():
            pass
        assert machine.state["status"] == "completed"
        return machine.state["run_id"]


def test_three_runs_leave_the_users_files_alone(tmp_path):
    cfg = real_config(tmp_path)
    out = cfg.out_dir
    os.makedirs(out)
    user_files(out)
    heidi_own = ("events.jsonl", "state.json", "heidi.lock", "runs", "logs", "eval", "control",
                 "out_lora_round_1", "out_lora_round_2")
    before = snapshot(out, heidi_own)
    ids = [run_to_end(cfg) for _ in range(3)]
    # the user's files, byte for byte (the current run's data files in data/ are not the user's)
    after = {k: v for k, v in snapshot(out, heidi_own).items() if "_round_" not in k}
    assert after == before
    for run_id in ids[:2]:
        archive = os.path.join(out, "runs", run_id)
        assert sorted(os.listdir(archive)) == ["data", "eval", "events.jsonl", "logs",
                                               "out_lora_round_1", "out_lora_round_2", "state.json"]
        # the run's files in the user's data/ went with it; the user's stayed
        assert sorted(os.listdir(os.path.join(archive, "data"))) == [
            "clean_round_1.jsonl", "clean_round_2.jsonl", "raw_round_1.jsonl", "raw_round_2.jsonl"]
        assert verify_run(cfg, os.path.join(archive, "events.jsonl"))[2] == run_id
        assert os.path.isfile(os.path.join(archive, "logs", "round_2", "train.log"))
    # the third run is where it was
    assert sorted(n for n in os.listdir(os.path.join(out, "data")) if "_round_" in n) == [
        "clean_round_1.jsonl", "clean_round_2.jsonl", "raw_round_1.jsonl", "raw_round_2.jsonl"]
    check_run(cfg)


def test_stage_start_records_the_topmost_directory_heidi_creates(tmp_path):
    cfg = real_config(tmp_path, ROUNDS=2)
    os.makedirs(os.path.join(cfg.out_dir, "data"))  # the user's
    run_to_end(cfg)
    starts = [e for e in read_events(cfg.journal_path) if e["event_type"] == "stage_start"]
    first, later = starts[0], starts[4]  # generate of round 1, generate of round 2
    assert first["stage"] == later["stage"] == "generate"
    assert first["artifact_paths"] == ["eval", "logs", "data/raw_round_1.jsonl"]
    assert later["artifact_paths"] == ["logs/round_2", "data/raw_round_2.jsonl"]
    train = [e for e in starts if e["stage"] == "train"][0]
    assert train["artifact_paths"] == ["logs/round_1/train.log", "data/train_round_1.jsonl",
                                       "data/val_round_1.jsonl", "out_lora_round_1"]


def test_a_stage_that_failed_or_was_killed_is_archived_too(tmp_path):
    """What a failed stage wrote before it failed belongs to the run as well."""
    cfg = real_config(tmp_path, ROUNDS=1)
    os.makedirs(os.path.join(cfg.out_dir, "data"))

    def failing(ctx, stage, round_):
        with open(os.path.join(ctx.config.data_dir, f"raw_round_{round_}.jsonl"), "w") as fh:
            fh.write("partial\n")
        return StageOutcome(ok=False, error="exited with code 1", output_tail="boom")

    with Machine(cfg, stage_runner=failing) as machine:
        machine.start()
        machine.tick()
        old = machine.state["run_id"]
        assert machine.state["status"] == "error"
        machine.start()
    assert os.listdir(os.path.join(cfg.out_dir, "data")) == []
    assert os.path.isfile(os.path.join(cfg.out_dir, "runs", old, "data", "raw_round_1.jsonl"))


def test_a_journal_naming_the_users_files_moves_none_of_them(tmp_path):
    """A line that claims heidi.toml, the scripts, a hidden folder, OUT_DIR itself or a path
    outside it (written by hand, or by a stage whose --output points there) moves nothing."""
    out = tmp_path / "out"
    out.mkdir()
    user_files(str(out))
    cfg = Config.load(str(out / "heidi.toml"), environ={},
                      overrides={"OUT_DIR": str(out), "HEIDI_FSYNC": False})
    with JournalWriter(cfg.journal_path, "claims") as journal:
        journal.emit("pipeline_start", "Starting training pipeline (mode=full, rounds=1, "
                     "run_unit_tests=0)")
        journal.emit("script_success", "claims", stage="generate", artifact_paths=[
            "heidi.toml", "scripts", "scripts/01_teacher_generate.py", ".ssh", ".", "..",
            str(tmp_path), "../elsewhere", "runs", "heidi.lock", "control", str(out / "NOTES.md")])
        journal.emit("pipeline_complete", "done", level="success")
    assert owned_paths(cfg) == ["NOTES.md"]  # an absolute path inside OUT_DIR is the run's
    before = snapshot(str(out), ("events.jsonl", "state.json", "heidi.lock", "runs", "NOTES.md"))
    with Machine(cfg, stage_runner=mock_stage) as machine:
        machine.start()  # rebuilds the state from the journal, archives the run, starts anew
    assert snapshot(str(out), ("events.jsonl", "state.json", "heidi.lock", "runs", "NOTES.md")) == before
    assert os.path.isfile(out / "runs" / "claims" / "NOTES.md")


@pytest.mark.parametrize("how", ["/", "home", "home-via-toml", "home-via-dot"])
def test_out_dir_root_or_home_refused(tmp_path, monkeypatch, how):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    env = {}
    path = None
    if how == "/":
        env["OUT_DIR"] = "/"
    elif how == "home":
        env["OUT_DIR"] = str(home) + "/"
    else:
        path = home / "heidi.toml"
        path.write_text('out_dir = "~"\n' if how == "home-via-toml" else 'out_dir = "."\n')
    with pytest.raises(ConfigError) as info:
        Config.load(str(path) if path else None, environ=env)
    assert "OUT_DIR" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(home) == (["heidi.toml"] if path else [])


def test_out_dir_home_refused_by_the_cli_with_exit_2(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = heidi_cli("run", HOME=str(home), OUT_DIR=str(home), HEIDI_MOCK_SUBPROCESSES="1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "home directory" in result.stderr
    assert os.listdir(home) == []
    # a directory inside home is fine
    result = heidi_cli("run", HOME=str(home), OUT_DIR=str(home / "run"), HEIDI_MOCK_SUBPROCESSES="1",
                       ROUNDS="1", HEIDI_FSYNC="0")
    assert result.returncode == 0, result.stderr
