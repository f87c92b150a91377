"""`heidi verify` from the command line: a real mock-mode journal passes, and every kind of damage
fails with exit 1 and `line N: reason` naming the line where the damage shows."""
from __future__ import annotations

import hashlib
import os
import re
import shutil

import orjson
import pytest

from cli_helpers import heidi_cli

RUN = "verify_run_1"
CHAIN_BROKEN = ("prev_hash does not match the previous line (chain broken: that line was changed, "
                "or lines were deleted, swapped or inserted before this one)")
CANONICAL = "not in canonical form (extra whitespace, other escaping or duplicate keys)"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-round mock run: events.jsonl + state.json (head recorded)."""
    out = tmp_path_factory.mktemp("run")
    result = heidi_cli("run", "--out-dir", str(out), HEIDI_MOCK_SUBPROCESSES="1", ROUNDS="2",
                       RUN_ID=RUN)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def lines(run_dir):
    with open(run_dir / "events.jsonl", "rb") as fh:
        return fh.readlines()


@pytest.fixture
def copy_run(run_dir, tmp_path):
    """A fresh copy of the run's journal and state.json, with the journal replaced by `data`."""
    def make(data: bytes):
        dest = tmp_path / "copy"
        dest.mkdir()
        shutil.copy(run_dir / "state.json", dest / "state.json")
        (dest / "events.jsonl").write_bytes(data)
        return dest
    return make


# -- a valid journal --------------------------------------------------------------------------

def test_valid_run_verifies(run_dir, lines):
    head = hashlib.sha256(lines[-1]).hexdigest()
    assert len(lines) > 20  # two full rounds
    for args in ([str(run_dir)], [str(run_dir / "events.jsonl")], ["--out-dir", str(run_dir)]):
        result = heidi_cli("verify", *args)
        assert (result.returncode, result.stdout, result.stderr) == (
            0, f"OK: {len(lines)} events, head {head[:12]}\n", ""), args


def test_valid_run_verifies_json(run_dir, lines):
    result = heidi_cli("verify", str(run_dir), "--json")
    assert result.returncode == 0
    out = orjson.loads(result.stdout)
    assert out["ok"] is True
    assert (out["events"], out["head"], out["run_id"]) == (
        len(lines), hashlib.sha256(lines[-1]).hexdigest(), RUN)
    assert out["path"] == str(run_dir / "events.jsonl")


def test_start_then_ticks_verify(tmp_path):
    out = str(tmp_path / "ticked")
    env = {"HEIDI_MOCK_SUBPROCESSES": "1", "ROUNDS": "2"}
    assert heidi_cli("start", "--out-dir", out, **env).returncode == 0
    for _ in range(5):
        result = heidi_cli("tick", "--out-dir", out, **env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    with open(os.path.join(out, "events.jsonl"), "rb") as fh:
        lines = fh.readlines()
    with open(os.path.join(out, "state.json"), "rb") as fh:
        state = orjson.loads(fh.read())
    head = hashlib.sha256(lines[-1]).hexdigest()
    assert (state["journal"]["events"], state["journal"]["head"]) == (len(lines), head)
    result = heidi_cli("verify", "--out-dir", out)
    assert (result.returncode, result.stdout) == (0, f"OK: {len(lines)} events, head {head[:12]}\n")


# -- damage -----------------------------------------------------------------------------------

K = 7  # a script_success line in the middle of the run (it has a usage_delta)


def _at(lines, k, new):
    out = list(lines)
    out[k - 1] = new
    return b"".join(out)


def _sub(lines, k, pattern: bytes, repl: bytes):
    new, n = re.subn(pattern, repl, lines[k - 1], count=1)
    assert n == 1, (pattern, lines[k - 1])
    return _at(lines, k, new)


def _obj(line: bytes) -> dict:
    return orjson.loads(line)


def _redump(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _replace_prev(line: bytes, prev: str) -> bytes:
    return re.sub(rb'"prev_hash":"[^"]*"', b'"prev_hash":"' + prev.encode() + b'"', line)


def _flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


# name -> (damage(lines) -> bytes, line(n) -> expected line number, expected reason or regex)
DAMAGE = {
    "edited byte in a message": (
        lambda L: _sub(L, 5, rb"Finished generate", b"Finished generatE"),
        lambda n: 6, CHAIN_BROKEN),  # line 5 parses; its changed hash no longer links to 6
    "edited byte in the last line": (
        lambda L: _sub(L, len(L), rb"Completed 2", b"Completed 3"),
        lambda n: n, "last line's hash differs from the head in state.json"),
    "edited byte in a prev_hash": (
        lambda L: _at(L, K, _replace_prev(L[K - 1], _flip_hex(_obj(L[K - 1])["prev_hash"]))),
        lambda n: K, CHAIN_BROKEN),
    "prev_hash in upper case": (
        lambda L: _at(L, K, _replace_prev(L[K - 1], _obj(L[K - 1])["prev_hash"].upper())),
        lambda n: K, "prev_hash is not a lowercase hex SHA-256"),
    "rewritten prev_hash": (
        lambda L: _at(L, K, _replace_prev(L[K - 1], hashlib.sha256(b"forged").hexdigest())),
        lambda n: K, CHAIN_BROKEN),
    "deleted line": (
        lambda L: b"".join(L[:K - 1] + L[K:]),
        lambda n: K, CHAIN_BROKEN),
    "deleted first line": (
        lambda L: b"".join(L[1:]),
        lambda n: 1, "first event's prev_hash is not its run_id (wrong genesis)"),
    "two lines swapped": (
        lambda L: b"".join(L[:K - 1] + [L[K], L[K - 1]] + L[K + 1:]),
        lambda n: K, CHAIN_BROKEN),
    "duplicated line": (
        lambda L: b"".join(L[:K] + [L[K - 1]] + L[K:]),
        lambda n: K + 1, CHAIN_BROKEN),
    "extra key": (
        lambda L: _sub(L, K, rb'"error":null,', b'"error":null,"note":"hi",'),
        lambda n: K, "unknown key 'note'"),
    "missing key": (
        lambda L: _sub(L, K, rb'"error":null,', b""),
        lambda n: K, "missing key 'error'"),
    "wrong event_version": (
        lambda L: _sub(L, K, rb'"event_version":"1.0"', b'"event_version":"1.1"'),
        lambda n: K, "event_version '1.1', expected '1.0'"),
    "NaN in usage_delta": (
        lambda L: _sub(L, K, rb'"cpu_pct":[0-9.]+', b'"cpu_pct":NaN'),
        lambda n: K, "NaN/Infinity is not valid JSON"),
    "Infinity in usage_delta": (
        lambda L: _sub(L, K, rb'"cpu_pct":[0-9.]+', b'"cpu_pct":Infinity'),
        lambda n: K, "NaN/Infinity is not valid JSON"),
    "-Infinity in usage_delta": (
        lambda L: _sub(L, K, rb'"cpu_pct":[0-9.]+', b'"cpu_pct":-Infinity'),
        lambda n: K, "NaN/Infinity is not valid JSON"),
    "garbage appended with newline": (
        lambda L: b"".join(L) + b"garbage\n",
        lambda n: n + 1, re.compile(r"invalid JSON \(.+\)")),
    "garbage appended without newline": (
        lambda L: b"".join(L) + b"garbage",
        lambda n: n + 1, "last line is cut off (no newline)"),
    "empty line appended": (
        lambda L: b"".join(L) + b"\n",
        lambda n: n + 1, re.compile(r"invalid JSON \(.+\)")),
    "valid-looking event appended without chain": (
        lambda L: b"".join(L) + _replace_prev(L[-1], hashlib.sha256(b"x").hexdigest()),
        lambda n: n + 1, CHAIN_BROKEN),
    "wrong genesis": (
        lambda L: _at(L, 1, _replace_prev(L[0], "another_run")),
        lambda n: 1, "first event's prev_hash is not its run_id (wrong genesis)"),
    "another run's event": (
        lambda L: _sub(L, K, rb'"run_id":"verify_run_1"', b'"run_id":"verify_run_2"'),
        lambda n: K, "run_id 'verify_run_2' differs from the journal's run 'verify_run_1'"),
    "cut-off tail (last line removed)": (
        lambda L: b"".join(L[:-1]),
        lambda n: n, re.compile(r"journal ends after (\d+) events but state.json records (\d+): "
                                r"the tail was cut off")),
    "cut-off tail (last three lines removed)": (
        lambda L: b"".join(L[:-3]),
        lambda n: n - 2, re.compile(r"journal ends after \d+ events but state.json records \d+: "
                                    r"the tail was cut off")),
    "truncated last line (no newline)": (
        lambda L: b"".join(L)[:-1],
        lambda n: n, "last line is cut off (no newline)"),
    "half of the last line": (
        lambda L: b"".join(L[:-1]) + L[-1][:len(L[-1]) // 2],
        lambda n: n, "last line is cut off (no newline)"),
    "line over 1 MiB": (
        lambda L: _sub(L, K, rb'"message":"[^"]*"', b'"message":"' + b"x" * (1 << 20) + b'"'),
        lambda n: K, "line longer than 1048576 bytes"),
    "over-long last line without newline": (
        lambda L: b"".join(L) + b"y" * ((1 << 20) + 10),
        lambda n: n + 1, "line longer than 1048576 bytes"),
    "invalid UTF-8": (
        lambda L: _sub(L, K, rb"succeeded", b"succ\xff\xfeded"),
        lambda n: K, "invalid UTF-8"),
    "invalid JSON": (
        lambda L: _at(L, K, L[K - 1][:-2] + b"\n"),  # closing brace gone
        lambda n: K, re.compile(r"invalid JSON \(.+\)")),
    "JSON array instead of object": (
        lambda L: _at(L, K, _redump(list(_obj(L[K - 1]).values()))),
        lambda n: K, "not a JSON object"),
    "keys reordered": (
        lambda L: _at(L, K, _redump(dict(sorted(_obj(L[K - 1]).items())))),
        lambda n: K, "keys out of order"),
    "extra whitespace": (
        lambda L: _sub(L, K, rb'"level":', b'"level": '),
        lambda n: K, CANONICAL),
    "pretty-printed line": (
        lambda L: _at(L, K, orjson.dumps(_obj(L[K - 1]), option=orjson.OPT_INDENT_2) + b"\n"),
        lambda n: K, re.compile(r"invalid JSON \(.+\)")),  # its first physical line is "{"
    "CRLF line ending": (
        lambda L: _at(L, K, L[K - 1][:-1] + b"\r\n"),
        lambda n: K, CANONICAL),
    "duplicate key": (
        lambda L: _sub(L, K, rb'"error":null,', b'"error":null,"error":null,'),
        lambda n: K, CANONICAL),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_is_reported_at_the_right_line(name, lines, copy_run):
    damage, line_of, reason = DAMAGE[name]
    n = len(lines)
    run = copy_run(damage(lines))
    result = heidi_cli("verify", str(run))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr == ""
    out = result.stdout.splitlines()
    assert len(out) == 1, result.stdout
    match = re.fullmatch(r"line (\d+): (.+)", out[0])
    assert match, out[0]
    assert int(match.group(1)) == line_of(n), out[0]
    if isinstance(reason, str):
        assert match.group(2) == reason
    else:
        assert reason.fullmatch(match.group(2)), match.group(2)


def test_cut_off_tail_names_counts(lines, copy_run):
    run = copy_run(b"".join(lines[:-1]))
    result = heidi_cli("verify", str(run / "events.jsonl"))  # state.json beside the file is used
    n = len(lines)
    assert (result.returncode, result.stdout) == (
        1, f"line {n}: journal ends after {n - 1} events but state.json records {n}: "
           "the tail was cut off\n")


def test_damage_reported_as_json(lines, copy_run):
    run = copy_run(b"".join(lines[:K - 1] + lines[K:]))
    result = heidi_cli("verify", "--json", "--out-dir", str(run))
    assert result.returncode == 1
    out = orjson.loads(result.stdout)
    assert (out["ok"], out["line"], out["reason"]) == (False, K, CHAIN_BROKEN)
    assert out["path"] == str(run / "events.jsonl")


def test_journal_alone_is_checked_without_state(lines, tmp_path):
    """Without a state.json beside it, a journal cut back to a whole line still verifies:
    only the head recorded in state.json can tell."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(lines[:-1]))
    result = heidi_cli("verify", str(path))
    assert (result.returncode, result.stdout) == (
        0, f"OK: {len(lines) - 1} events, head {hashlib.sha256(lines[-2]).hexdigest()[:12]}\n")


# -- usage errors -----------------------------------------------------------------------------

def test_missing_path_is_usage_error(tmp_path):
    result = heidi_cli("verify", str(tmp_path / "nope" / "events.jsonl"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "nope" in result.stderr


def test_dir_without_journal_is_usage_error(tmp_path):
    result = heidi_cli("verify", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert os.path.join(str(tmp_path), "events.jsonl") in result.stderr


def test_dir_uses_its_events_jsonl(run_dir, lines, tmp_path):
    dest = tmp_path / "other"
    dest.mkdir()
    shutil.copy(run_dir / "events.jsonl", dest / "events.jsonl")
    result = heidi_cli("verify", str(dest))
    assert result.returncode == 0
    assert result.stdout.startswith(f"OK: {len(lines)} events")
