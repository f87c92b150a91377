"""JournalWriter: what lands in events.jsonl — schema, limits, redaction before hashing, the chain
across processes, torn-tail repair, and the strict readers."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
import textwrap

import orjson
import pytest

import heidi
from heidi.errors import StateError
from heidi.journal import JournalWriter, read_events, read_tail, verify_journal

from cli_helpers import clean_env as _env
from cli_helpers import heidi_cli

KEYS = ("event_version", "ts", "run_id", "round", "stage", "level", "event_type", "message",
        "counters_delta", "usage_delta", "artifact_paths", "error", "prev_hash")
TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
RUN = "run_test_journal"
GITHUB_TOKEN = "ghp_" + "A" * 36  # built here so no secret-shaped literal sits in the repo


def identity(text: str) -> str:
    return text


def _lines(path) -> list[bytes]:
    with open(path, "rb") as fh:
        return fh.readlines()


def _events(path) -> list[dict]:
    return [orjson.loads(line) for line in _lines(path)]


@pytest.fixture
def redactor():
    """The real redactor (the default of JournalWriter); tests of redaction skip without it."""
    mod = pytest.importorskip("heidi._fast.redact")
    return mod.redact


@pytest.fixture
def journal(tmp_path):
    return str(tmp_path / "events.jsonl")


def _writer(path, redact=identity, **kw) -> JournalWriter:
    kw.setdefault("clock", heidi.MockClock("2026-02-20T07:45:38.307Z", step_s=0.001))
    return JournalWriter(path, RUN, redact=redact, fsync=False, **kw)


# -- what a line looks like -----------------------------------------------------------------

def test_thirteen_keys_in_order_and_ts_format(journal):
    with JournalWriter(journal, RUN, redact=identity, fsync=False) as writer:  # real clock
        writer.emit("pipeline_start", "go")
        writer.emit("stage_end", "done", stage="train", level="success", round=2,
                    counters_delta={"samples": 10}, usage_delta={"cpu_pct": 12.5},
                    artifact_paths=["out_lora_round_2"], error=None)
    lines = _lines(journal)
    assert len(lines) == 2
    for raw in lines:
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1
        event = orjson.loads(raw)
        assert tuple(event) == KEYS
        assert raw == orjson.dumps(event) + b"\n"  # compact, no spaces
        assert event["event_version"] == "1.0"
        assert TS_RE.match(event["ts"]), event["ts"]
    second = orjson.loads(lines[1])
    assert (second["round"], second["stage"], second["level"], second["event_type"]) == (
        2, "train", "success", "stage_end")
    assert second["counters_delta"] == {"samples": 10}
    assert second["usage_delta"] == {"cpu_pct": 12.5}
    assert second["artifact_paths"] == ["out_lora_round_2"]
    assert second["prev_hash"] == hashlib.sha256(lines[0]).hexdigest()
    assert orjson.loads(lines[0])["prev_hash"] == RUN


def test_emit_returns_the_bytes_written_and_head_follows(journal):
    with _writer(journal) as writer:
        assert writer.head == (0, RUN)
        line = writer.emit("x", "hello")
        assert writer.head == (1, hashlib.sha256(line).hexdigest())
    with open(journal, "rb") as fh:
        assert fh.read() == line


def test_message_truncated_to_500(journal):
    with _writer(journal) as writer:
        writer.emit("x", "m" * 5000, error="e" * 5000, artifact_paths=["d/" * 80 + "final.bin"])
        writer.emit("y", "n" * 500, error="f" * 200, artifact_paths=["p" * 100])
    first, second = _events(journal)
    assert len(first["message"]) == 500 and first["message"].endswith("…")
    assert first["message"][:499] == "m" * 499
    assert len(first["error"]) == 200 and first["error"].endswith("…")
    (path,) = first["artifact_paths"]
    assert len(path) == 100 and path.endswith("final.bin")  # the informative end is kept
    # at the limit: left alone
    assert (second["message"], second["error"], second["artifact_paths"]) == (
        "n" * 500, "f" * 200, ["p" * 100])
    assert verify_journal(journal)[0] == 2


def test_truncation_happens_after_redaction(journal, redactor):
    pad = "x" * 480
    many = " ".join([GITHUB_TOKEN] * 20)  # 819 chars before redaction, 299 after
    with _writer(journal, redact=redactor) as writer:
        writer.emit("x", pad + " " + GITHUB_TOKEN, error="y" * 180 + " " + GITHUB_TOKEN)
        writer.emit("y", many)
    data = open(journal, "rb").read()
    assert b"ghp_" not in data and b"AAAAAAAA" not in data
    first, second = _events(journal)
    # cut first, the token would have been half-kept and escaped the redactor
    assert first["message"] == pad + " " + redactor(GITHUB_TOKEN)
    assert redactor(GITHUB_TOKEN) == "[GITHUB_TOKEN]"
    assert first["error"].startswith("y" * 180 + " ")
    assert len(first["error"]) <= 200
    assert second["message"] == " ".join(["[GITHUB_TOKEN]"] * 20)


def test_secrets_redacted_in_message_error_and_paths(journal, redactor):
    with JournalWriter(journal, RUN, fsync=False) as writer:  # default redactor
        line = writer.emit("pipeline_error", f"push failed: token={GITHUB_TOKEN} rejected",
                           level="error", error=f"auth {GITHUB_TOKEN}",
                           artifact_paths=[f"logs/{GITHUB_TOKEN}.log"])
    data = open(journal, "rb").read()
    assert data == line
    assert GITHUB_TOKEN.encode() not in data and b"ghp_" not in data
    (event,) = _events(journal)
    assert "[GITHUB_TOKEN]" in event["message"] and "[GITHUB_TOKEN]" in event["error"]
    assert "[GITHUB_TOKEN]" in event["artifact_paths"][0]
    # hashed after redaction: the chain verifies as written
    assert verify_journal(journal) == (1, hashlib.sha256(data).hexdigest(), RUN)


def test_lone_surrogates_become_valid_utf8(journal):
    with _writer(journal) as writer:
        writer.emit("x", "bad name \udcff here", artifact_paths=["f\udce9.txt"])
    raw = open(journal, "rb").read()
    raw.decode("utf-8")  # strict
    assert verify_journal(journal)[0] == 1


@pytest.mark.parametrize("kwargs,exc", [
    ({"level": "debug"}, ValueError),
    ({"usage_delta": {"cpu_pct": float("nan")}}, ValueError),
    ({"usage_delta": {"cpu_pct": float("inf")}}, ValueError),
    ({"counters_delta": {"n": "3"}}, TypeError),
    ({"counters_delta": {"n": True}}, TypeError),
])
def test_bad_fields_raise_and_write_nothing(journal, kwargs, exc):
    with _writer(journal) as writer:
        writer.emit("ok", "first")
        with pytest.raises(exc):
            writer.emit("x", "m", **kwargs)
        assert writer.count == 1
        writer.emit("ok", "after")
    assert [e["event_type"] for e in _events(journal)] == ["ok", "ok"]
    assert verify_journal(journal)[0] == 2


def test_files_are_0600(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "run" / "events.jsonl")
        with _writer(path) as writer:
            writer.emit("x")
        with open(path, "ab") as fh:
            fh.write(b'{"torn')
        with _writer(path):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path + ".torn-1").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700


# -- the chain across writers and processes -----------------------------------------------

def test_chain_continues_across_writer_instances(journal):
    for i in range(3):
        with _writer(journal) as writer:
            assert writer.count == i * 2
            writer.emit("a", f"writer {i}")
            writer.emit("b", f"writer {i}")
    events = _events(journal)
    assert len(events) == 6
    assert events[0]["prev_hash"] == RUN
    lines = _lines(journal)
    for prev, event in zip(lines, events[1:]):
        assert event["prev_hash"] == hashlib.sha256(prev).hexdigest()
    assert verify_journal(journal) == (6, hashlib.sha256(lines[-1]).hexdigest(), RUN)


def test_chain_continues_in_another_process(journal):
    with _writer(journal) as writer:
        writer.emit("pipeline_start", "from the test process")
        head = writer.head
    script = textwrap.dedent(f"""
        from heidi.journal import JournalWriter
        with JournalWriter({journal!r}, {RUN!r}) as w:
            assert w.head == {head!r}, w.head
            w.emit("stage_start", "from a second process", stage="generate")
            w.emit("stage_end", "and again", stage="generate", usage_delta={{"cpu_pct": 1.5}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    events = _events(journal)
    assert [e["event_type"] for e in events] == ["pipeline_start", "stage_start", "stage_end"]
    assert events[1]["prev_hash"] == head[1]
    result = heidi_cli("verify", journal)
    assert (result.returncode, result.stdout.splitlines()) == (
        0, [f"OK: 3 events, head {hashlib.sha256(_lines(journal)[-1]).hexdigest()[:12]}"])


def test_writer_uses_known_head_without_counting(journal):
    with _writer(journal) as writer:
        for _ in range(4):
            writer.emit("x")
        head = writer.head
    with _writer(journal, head=head) as writer:
        assert writer.head == head
    with _writer(journal, head=(99, head[1])) as writer:
        assert writer.count == 99  # trusted: the caller (state.json) vouches for it
    with _writer(journal, head=(99, "0" * 64)) as writer:
        assert writer.head == head  # wrong hash: counted from the file instead


def test_writer_refuses_journal_of_another_run(journal):
    with _writer(journal) as writer:
        writer.emit("x")
    before = open(journal, "rb").read()
    with pytest.raises(StateError) as info:
        JournalWriter(journal, "some_other_run", redact=identity, fsync=False)
    assert "some_other_run" in str(info.value) and RUN in str(info.value)
    assert open(journal, "rb").read() == before


# -- torn tail ------------------------------------------------------------------------------

def test_torn_tail_is_set_aside_and_journaled(journal):
    with _writer(journal) as writer:
        for i in range(3):
            writer.emit("x", f"event {i}")
    whole = open(journal, "rb").read()
    half = _lines(journal)[1][:57]
    with open(journal, "ab") as fh:
        fh.write(half)
    with JournalWriter(journal, RUN, redact=identity) as writer:  # fsync on, as in a run
        assert writer.repaired == journal + ".torn-1"
        assert writer.count == 4
    assert open(journal + ".torn-1", "rb").read() == half
    data = open(journal, "rb").read()
    assert data.startswith(whole)
    last = orjson.loads(data[len(whole):])
    assert (last["event_type"], last["level"]) == ("journal_repaired", "warn")
    assert "57 bytes" in last["message"] and "events.jsonl.torn-1" in last["message"]
    assert last["prev_hash"] == hashlib.sha256(_lines(journal)[2]).hexdigest()
    result = heidi_cli("verify", journal)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: 4 events")


def test_second_torn_tail_goes_to_torn_2(journal):
    with _writer(journal) as writer:
        writer.emit("x")
    for expected in ("torn-1", "torn-2"):
        with open(journal, "ab") as fh:
            fh.write(b'{"event_version":"1.0","ts":"2026')
        with _writer(journal) as writer:
            assert writer.repaired == f"{journal}.{expected}"
    assert [e["event_type"] for e in _events(journal)] == ["x", "journal_repaired", "journal_repaired"]
    assert verify_journal(journal)[0] == 3


def test_journal_that_is_only_a_fragment(journal):
    with open(journal, "wb") as fh:
        fh.write(b'{"event_version":"1.0","ts":"20')
    with _writer(journal) as writer:
        assert writer.repaired
    (event,) = _events(journal)
    assert event["event_type"] == "journal_repaired" and event["prev_hash"] == RUN
    assert verify_journal(journal)[0] == 1


def test_read_tail(journal):
    assert not os.path.exists(journal)
    with _writer(journal) as writer:
        assert read_tail(journal) == (None, b"")
        lines = [writer.emit("x", "y" * 200 * i) for i in range(1, 4)]
    assert read_tail(journal) == (lines[-1], b"")
    with open(journal, "ab") as fh:
        fh.write(b"frag")
    assert read_tail(journal) == (lines[-1], b"frag")
    # a last line longer than the first tail read (64 KiB)
    with open(journal, "wb") as fh:
        fh.write(b"a\n" + b"b" * 200_000 + b"\n")
    assert read_tail(journal) == (b"b" * 200_000 + b"\n", b"")


# -- strict readers -------------------------------------------------------------------------

def test_read_events_and_verify_journal_name_the_bad_line(journal):
    with _writer(journal) as writer:
        for i in range(5):
            writer.emit("x", f"event {i}")
    assert [e["message"] for e in read_events(journal)] == [f"event {i}" for i in range(5)]
    lines = _lines(journal)
    lines[2] = lines[2].replace(b'"level":"info"', b'"level":"info","extra":1')
    with open(journal, "wb") as fh:
        fh.writelines(lines)
    with pytest.raises(heidi.JournalError) as info:
        list(read_events(journal))
    assert (info.value.line_no, info.value.reason) == (3, "unknown key 'extra'")
    with pytest.raises(heidi.JournalError) as info:
        verify_journal(journal)
    assert str(info.value) == "line 3: unknown key 'extra'"


def test_verify_journal_against_expected_head(journal):
    with _writer(journal) as writer:
        for _ in range(4):
            writer.emit("x")
        count, head = writer.head
    assert verify_journal(journal, (count, head)) == (4, head, RUN)
    lines = _lines(journal)
    with open(journal, "wb") as fh:
        fh.writelines(lines[:3])
    with pytest.raises(heidi.JournalError) as info:
        verify_journal(journal, (count, head))
    assert info.value.line_no == 4 and "cut off" in info.value.reason
    with pytest.raises(heidi.JournalError) as info:
        verify_journal(journal, (3, head))
    assert info.value.line_no == 3 and "state.json" in info.value.reason


def test_batch_mode_writes_a_transition_in_one_go(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = heidi.JournalWriter(str(path), RUN, clock=heidi.MockClock("2026-02-20T07:45:38.307Z"),
                                 redact=identity, fsync=False, batch=True)
    writer.emit("pipeline_start", "one")
    writer.emit("round_start", "two", round=1)
    assert path.read_bytes() == b""  # held back until the transition ends
    assert writer.last_event["message"] == "two" and writer.last_event["round"] == 1
    writer.sync()
    first = path.read_bytes()
    assert first.count(b"\n") == 2
    writer.emit("stage_start", "three", stage="generate")
    writer.close()  # closing writes what is held back
    assert path.read_bytes().startswith(first) and path.read_bytes().count(b"\n") == 3
    assert heidi.verify_journal(str(path))[0] == 3
