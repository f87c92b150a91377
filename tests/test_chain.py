"""Journal lines (heidi/_fast chain twins): the walkthrough's test vector, strict checking, and
identical verdicts from the compiled and the pure-Python implementation."""
from __future__ import annotations

import hashlib
import importlib
import io
import os

import orjson
import pytest

import heidi
from heidi import journal as journal_mod

CHAIN_BROKEN = ("prev_hash does not match the previous line (chain broken: that line was changed, "
                "or lines were deleted, swapped or inserted before this one)")

# The two-line events.jsonl fragment of walkthrough.md, byte for byte (design.md §3.1).
VECTOR_LINE_1 = (
    '{"event_version":"1.0","ts":"2026-02-20T07:45:38.307Z","run_id":"test_cpp_run_123","round":1,'
    '"stage":"pipeline","level":"info","event_type":"pipeline_start",'
    '"message":"Starting training pipeline (C++)","counters_delta":{},"usage_delta":{},'
    '"artifact_paths":[],"error":null,"prev_hash":"test_cpp_run_123"}'
)
VECTOR_LINE_2 = (
    '{"event_version":"1.0","ts":"2026-02-20T07:45:38.307Z","run_id":"test_cpp_run_123","round":1,'
    '"stage":"generate","level":"info","event_type":"stage_start",'
    '"message":"Starting teacher generation","counters_delta":{},"usage_delta":{},'
    '"artifact_paths":[],"error":null,'
    '"prev_hash":"597846557e991975f30a5a3fb10af0cc11da934b2879f8c9b4d04443f4f5149a"}'
)
VECTOR_HASH_1 = "597846557e991975f30a5a3fb10af0cc11da934b2879f8c9b4d04443f4f5149a"
TS = "2026-02-20T07:45:38.307Z"
RUN = "test_cpp_run_123"
KEYS = ("event_version", "ts", "run_id", "round", "stage", "level", "event_type", "message",
        "counters_delta", "usage_delta", "artifact_paths", "error", "prev_hash")


def _line1(mod) -> bytes:
    return mod.encode_event(TS, RUN, 1, "pipeline", "info", "pipeline_start",
                            "Starting training pipeline (C++)", {}, {}, [], None, RUN)


def _line2(mod, prev: str) -> bytes:
    return mod.encode_event(TS, RUN, 1, "generate", "info", "stage_start",
                            "Starting teacher generation", {}, {}, [], None, prev)


def _event(**fields) -> dict:
    event = {"event_version": "1.0", "ts": TS, "run_id": RUN, "round": 1, "stage": "pipeline",
             "level": "info", "event_type": "pipeline_start", "message": "m",
             "counters_delta": {}, "usage_delta": {}, "artifact_paths": [], "error": None,
             "prev_hash": RUN}
    event.update(fields)
    return event


def _raw(obj) -> bytes:
    return orjson.dumps(obj) + b"\n"


def _journal(n: int, mod=None) -> list[bytes]:
    """n valid lines of one run, chained."""
    mod = mod or importlib.import_module("heidi._fast._chain_py")
    lines, prev = [], RUN
    for i in range(n):
        line = mod.encode_event(TS, RUN, 1 + i // 3, "generate", "info", f"event_{i}",
                                f"message {i} with \"quotes\", \\ and ünïcode",
                                {"samples": i}, {"cpu_pct": 1.5 * i}, [f"data/raw_{i}.jsonl"],
                                None if i % 2 else f"error {i}", prev)
        lines.append(line)
        prev = hashlib.sha256(line).hexdigest()
    return lines


# -- the walkthrough test vector ----------------------------------------------------------

def test_vector_line_1_rebuilt_byte_for_byte(fast_impl):
    mod = fast_impl("chain")
    line = _line1(mod)
    assert line == VECTOR_LINE_1.encode() + b"\n"
    assert mod.line_hash(line) == VECTOR_HASH_1
    assert hashlib.sha256(line).hexdigest() == VECTOR_HASH_1


def test_vector_line_2_chains_to_line_1(fast_impl):
    mod = fast_impl("chain")
    line2 = _line2(mod, mod.line_hash(_line1(mod)))
    assert line2 == VECTOR_LINE_2.encode() + b"\n"


def test_vector_fragment_verifies(fast_impl):
    mod = fast_impl("chain")
    data = (VECTOR_LINE_1 + "\n" + VECTOR_LINE_2 + "\n").encode()
    count, head, run_id = mod.verify_stream(io.BytesIO(data))
    assert (count, run_id) == (2, RUN)
    assert head == hashlib.sha256(VECTOR_LINE_2.encode() + b"\n").hexdigest()


def _vector_writer(path, monkeypatch, mod, clock):
    monkeypatch.setattr(journal_mod, "_chain", mod)
    return heidi.JournalWriter(str(path), RUN, clock=clock, redact=lambda s: s, fsync=False,
                               round=1)


def test_journal_writer_reproduces_vector_on_disk(fast_impl, tmp_path, monkeypatch):
    mod = fast_impl("chain")
    path = tmp_path / "events.jsonl"
    with _vector_writer(path, monkeypatch, mod, heidi.MockClock(TS)) as writer:
        writer.emit("pipeline_start", "Starting training pipeline (C++)")
        writer.emit("stage_start", "Starting teacher generation", stage="generate")
        assert writer.head == (2, hashlib.sha256(VECTOR_LINE_2.encode() + b"\n").hexdigest())
    assert path.read_bytes() == (VECTOR_LINE_1 + "\n" + VECTOR_LINE_2 + "\n").encode()


def test_journal_writer_reproduces_vector_with_heidi_clock_env(fast_impl, tmp_path, monkeypatch):
    mod = fast_impl("chain")
    monkeypatch.setenv("HEIDI_CLOCK", TS)
    path = tmp_path / "events.jsonl"
    with _vector_writer(path, monkeypatch, mod, None) as writer:
        writer.emit("pipeline_start", "Starting training pipeline (C++)")
    # a second writer (as a second process would) continues the chain from the tail
    with _vector_writer(path, monkeypatch, mod, None) as writer:
        assert writer.head == (1, VECTOR_HASH_1)
        writer.emit("stage_start", "Starting teacher generation", stage="generate")
    assert path.read_bytes() == (VECTOR_LINE_1 + "\n" + VECTOR_LINE_2 + "\n").encode()


# -- encode_event -------------------------------------------------------------------------

def test_encode_event_keeps_quotes_and_unicode_valid_json(fast_impl):
    mod = fast_impl("chain")
    message = 'say "hi"\n\\ tab\t ünï 😀 </script>'
    line = mod.encode_event(TS, RUN, 2, "train", "error", "pipeline_error", message,
                            {"n": 3}, {"cpu_pct": 12.5}, ["a/b c.json"], 'exit "3"', RUN)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = orjson.loads(line)
    assert tuple(obj) == KEYS
    assert obj["message"] == message and obj["error"] == 'exit "3"'
    assert b'": ' not in line and b', "' not in line  # compact: no whitespace between tokens
    assert mod.check_line(line, None) == obj


# -- check_line / verify_stream: acceptance ----------------------------------------------------

def test_check_line_accepts_a_valid_chain(fast_impl):
    mod = fast_impl("chain")
    prev = None
    for line in _journal(6, mod):
        event = mod.check_line(line, prev, RUN)
        assert event["run_id"] == RUN
        prev = mod.line_hash(line)


def test_check_line_accepts_every_level_and_numbers(fast_impl):
    mod = fast_impl("chain")
    for level in ("info", "warn", "error", "success", "critical"):
        line = _raw(_event(level=level, counters_delta={"a": 1, "b": -2},
                           usage_delta={"x": 0.25, "y": 10 ** 12}, round=0,
                           message="x" * 500, error="e" * 200, artifact_paths=["p" * 100]))
        assert mod.check_line(line, None)["level"] == level


def test_limits_are_the_ones_chain_types_states(fast_impl):
    # Each limit is one statement in _chain_types; the compiled twin reads it at import. A value
    # at the limit passes, one over is refused with a reason naming the limit, on both twins.
    from heidi._fast import _chain_types as t
    mod = fast_impl("chain")
    cases = (("message", t.MAX_MESSAGE_CHARS, lambda n: "m" * n),
             ("error", t.MAX_ERROR_CHARS, lambda n: "e" * n),
             ("artifact_paths", t.MAX_ARTIFACT_CHARS, lambda n: ["p" * n]),
             ("run_id", t.MAX_RUN_ID_CHARS, lambda n: "r" * n),
             ("stage", t.MAX_NAME_CHARS, lambda n: "s" * n),
             ("event_type", t.MAX_NAME_CHARS, lambda n: "t" * n))
    for key, limit, value in cases:
        def event(n, key=key, value=value):
            fields = {key: value(n)}
            if key == "run_id":
                fields["prev_hash"] = fields["run_id"]
            return _event(**fields)
        assert mod.check_event(event(limit), None, None) is None, key
        reason = mod.check_event(event(limit + 1), None, None)
        assert reason is not None and f"{limit} characters" in reason, (key, reason)
    assert mod.check_event(_event(event_version="0.9"), None, None) == (
        f"event_version '0.9', expected {t.EVENT_VERSION!r}")
    extra = dict(_event(), extra=1)
    assert mod.check_event(extra, None, None) == "unknown key 'extra'"
    assert mod.KEYS == t.KEYS and mod.MAX_LINE_BYTES == t.MAX_LINE_BYTES
    too_long = b"x" * t.MAX_LINE_BYTES + b"\n"
    assert mod.parse_line(too_long) == (None, f"line longer than {t.MAX_LINE_BYTES} bytes")
    assert mod.parse_line(_raw(_event()))[1] is None


def test_one_encoder_writes_every_line(fast_impl):
    # encode_event and JournalWriter.emit both go through _chain_types.event_line.
    from heidi._fast import _chain_types as t
    mod = fast_impl("chain")
    assert mod.encode_event is t.encode_event and mod.event_line is t.event_line
    assert mod.new_event(TS, RUN, 1, "pipeline", "info", "pipeline_start",
                         "Starting training pipeline (C++)", {}, {}, [], None,
                         RUN) == orjson.loads(VECTOR_LINE_1)


def test_verify_stream_counts_and_returns_head(fast_impl):
    mod = fast_impl("chain")
    lines = _journal(10, mod)
    count, head, run_id = mod.verify_stream(io.BytesIO(b"".join(lines)))
    assert (count, head, run_id) == (10, hashlib.sha256(lines[-1]).hexdigest(), RUN)


def test_verify_stream_empty_journal(fast_impl):
    mod = fast_impl("chain")
    assert mod.verify_stream(io.BytesIO(b"")) == (0, None, None)


def test_verify_stream_continues_from_a_known_position(fast_impl):
    mod = fast_impl("chain")
    lines = _journal(8, mod)
    head3 = hashlib.sha256(lines[2]).hexdigest()
    count, head, run_id = mod.verify_stream(io.BytesIO(b"".join(lines[3:])), 3, head3, RUN)
    assert (count, head, run_id) == (8, hashlib.sha256(lines[-1]).hexdigest(), RUN)
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(io.BytesIO(b"".join(lines[4:])), 3, head3, RUN)
    assert info.value.line_no == 4
    assert "chain broken" in info.value.reason


class _Trickle(io.RawIOBase):
    """A stream that hands out a few bytes per read, so lines straddle every chunk boundary."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self._data[self._pos:self._pos + min(n, self._step)]
        self._pos += len(chunk)
        return chunk


@pytest.mark.parametrize("step", [1, 7, 250])
def test_verify_stream_lines_split_across_reads(fast_impl, step):
    mod = fast_impl("chain")
    lines = _journal(5, mod)
    data = b"".join(lines)
    assert mod.verify_stream(_Trickle(data, step))[:2] == (5, hashlib.sha256(lines[-1]).hexdigest())
    damaged = data.replace(b"message 3", b"massage 3")
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(_Trickle(damaged, step))
    assert (info.value.line_no, info.value.reason) == (
        5, CHAIN_BROKEN)


def test_journal_error_text_names_line(fast_impl):
    mod = fast_impl("chain")
    err = mod.JournalError(7, "keys out of order")
    assert isinstance(err, ValueError)
    assert str(err) == "line 7: keys out of order"
    assert (err.line_no, err.reason) == (7, "keys out of order")


# -- rejections: every reason -------------------------------------------------------------

_H = "0" * 64
_MSG_LONG = "x" * 501
# (line bytes, expected_prev, run_id, reason) — reason is matched exactly.
REJECTIONS = [
    (b'[1,2]\n', None, None, "not a JSON object"),
    (b'"text"\n', None, None, "not a JSON object"),
    (b'null\n', None, None, "not a JSON object"),
    (_raw({**_event(), "extra": 1}), None, None, "unknown key 'extra'"),
    (_raw({k: v for k, v in _event().items() if k != "usage_delta"}), None, None,
     "missing key 'usage_delta'"),
    (_raw(dict(reversed(list(_event().items())))), None, None, "keys out of order"),
    (_raw({("note" if k == "message" else k): v for k, v in _event().items()}), None, None,
     "unknown key 'note'"),  # 13 keys, one renamed in place
    (_raw({**{k: v for k, v in _event().items() if k != "ts"}, "ts": _event()["ts"]}), None,
     None, "keys out of order"),  # 13 keys, the right ones, one moved to the end
    (_raw(_event(event_version="1.1")), None, None, "event_version '1.1', expected '1.0'"),
    (_raw(_event(event_version=1.0)), None, None, "event_version 1.0, expected '1.0'"),
    (_raw(_event(ts="2026-02-20 07:45:38")), None, None,
     "ts is not a UTC timestamp like 2026-02-20T07:45:38.307Z"),
    (_raw(_event(ts="2026-02-20T07:45:38.307+01:00")), None, None,
     "ts is not a UTC timestamp like 2026-02-20T07:45:38.307Z"),
    (_raw(_event(run_id="../evil", prev_hash="../evil")), None, None,
     "run_id is not 1-128 characters of [A-Za-z0-9._-]"),
    (_raw(_event(run_id="other", prev_hash="other")), None, RUN,
     "run_id 'other' differs from the journal's run 'test_cpp_run_123'"),
    (_raw(_event(round=-1)), None, None, "round is not a non-negative integer"),
    (_raw(_event(round=1.0)), None, None, "round is not a non-negative integer"),
    (_raw(_event(round=True)), None, None, "round is not a non-negative integer"),
    (_raw(_event(stage="a b")), None, None, "stage is not a name of 1-64 characters [A-Za-z0-9_.-]"),
    (_raw(_event(stage="")), None, None, "stage is not a name of 1-64 characters [A-Za-z0-9_.-]"),
    (_raw(_event(event_type="x" * 65)), None, None,
     "event_type is not a name of 1-64 characters [A-Za-z0-9_.-]"),
    (_raw(_event(level="debug")), None, None,
     "level is not one of info, warn, error, success, critical"),
    (_raw(_event(message=_MSG_LONG)), None, None, "message is not a string of at most 500 characters"),
    (_raw(_event(message=None)), None, None, "message is not a string of at most 500 characters"),
    (_raw(_event(counters_delta=[])), None, None, "counters_delta is not an object"),
    (_raw(_event(counters_delta={"n": "3"})), None, None,
     "counters_delta has a value that is not a number"),
    (_raw(_event(usage_delta={"ok": True})), None, None,
     "usage_delta has a value that is not a number"),
    (_raw(_event(usage_delta={"x": None})), None, None,
     "usage_delta has a value that is not a number"),
    (_raw(_event(artifact_paths="a.json")), None, None, "artifact_paths is not an array"),
    (_raw(_event(artifact_paths=["p" * 101])), None, None,
     "artifact_paths has an entry that is not a string of at most 100 characters"),
    (_raw(_event(artifact_paths=[3])), None, None,
     "artifact_paths has an entry that is not a string of at most 100 characters"),
    (_raw(_event(error="e" * 201)), None, None,
     "error is not null or a string of at most 200 characters"),
    (_raw(_event(error=0)), None, None, "error is not null or a string of at most 200 characters"),
    (_raw(_event(prev_hash=None)), None, None, "prev_hash is not a string"),
    (_raw(_event(prev_hash="someone_else")), None, None,
     "first event's prev_hash is not its run_id (wrong genesis)"),
    (_raw(_event(prev_hash=_H)), None, None,
     "first event's prev_hash is not its run_id (wrong genesis)"),
    (_raw(_event(prev_hash=RUN)), _H, None, "prev_hash is not a lowercase hex SHA-256"),
    (_raw(_event(prev_hash=_H.upper().replace("0", "A"))), _H, None,
     "prev_hash is not a lowercase hex SHA-256"),
    (_raw(_event(prev_hash="1" * 64)), _H, None,
     CHAIN_BROKEN),
    (_raw(_event(message="x" * (1 << 20))), None, None, "line longer than 1048576 bytes"),
    (_raw(_event())[:-1], None, None, "last line is cut off (no newline)"),
    (b"", None, None, "last line is cut off (no newline)"),
    (_raw(_event(message="caf\u00e9")).replace("\u00e9".encode(), b"\xe9"), None, None,
     "invalid UTF-8"),
    (b'{"a":"\xed\xa0\x80"}\n', None, None, "invalid UTF-8"),
    (_raw(_event(usage_delta={"x": 1.5})).replace(b"1.5", b"NaN"), None, None,
     "NaN/Infinity is not valid JSON"),
    (_raw(_event(usage_delta={"x": 1.5})).replace(b"1.5", b"Infinity"), None, None,
     "NaN/Infinity is not valid JSON"),
    (_raw(_event(usage_delta={"x": 1.5})).replace(b"1.5", b"-Infinity"), None, None,
     "NaN/Infinity is not valid JSON"),
    (_raw(_event()).replace(b'"info"', b'"info",'), None, None, None),  # invalid JSON, see below
    (_raw(_event()).replace(b'"level":', b'"level" :'), None, None,
     "not in canonical form (extra whitespace, other escaping or duplicate keys)"),
    (_raw(_event()).replace(b"}\n", b"} \n"), None, None,
     "not in canonical form (extra whitespace, other escaping or duplicate keys)"),
    (_raw(_event()).replace(b"\n", b"\r\n"), None, None,
     "not in canonical form (extra whitespace, other escaping or duplicate keys)"),
    (_raw(_event(message="A")).replace(b'"A"', b'"\\u0041"'), None, None,
     "not in canonical form (extra whitespace, other escaping or duplicate keys)"),
    (_raw(_event()).replace(b'"error":null', b'"error":null,"error":null'), None, None,
     "not in canonical form (extra whitespace, other escaping or duplicate keys)"),
]


@pytest.mark.parametrize("line,prev,run_id,reason", REJECTIONS,
                         ids=[f"r{i}" for i in range(len(REJECTIONS))])
def test_check_line_rejects_with_reason(fast_impl, line, prev, run_id, reason):
    mod = fast_impl("chain")
    with pytest.raises(ValueError) as info:
        mod.check_line(line, prev, run_id)
    if reason is None:
        assert str(info.value).startswith("invalid JSON (")
    else:
        assert str(info.value) == reason


def test_rejection_table_covers_every_reason():
    """Every reason either twin can give appears in REJECTIONS (a new one needs a case here)."""
    import re
    source = importlib.import_module("heidi._fast._chain_py").__file__
    with open(source, encoding="utf-8") as fh:
        text = fh.read()
    produced = set(re.findall(r'return (?:None, )?f?"([^"{]{8,})', text))
    expected = " | ".join(r for *_, r in REJECTIONS if r)
    missing = [r for r in produced if r not in expected and "invalid JSON" not in r]
    assert not missing, missing


def test_verify_stream_names_the_bad_line(fast_impl):
    mod = fast_impl("chain")
    lines = _journal(5, mod)
    lines[3] = lines[3].replace(b'"round":2', b'"round":20')
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(io.BytesIO(b"".join(lines)))
    # line 4 itself is well-formed; its edit breaks the link from line 5
    assert (info.value.line_no, info.value.reason) == (
        5, CHAIN_BROKEN)
    assert str(info.value) == "line 5: " + CHAIN_BROKEN


def test_verify_stream_torn_tail_and_long_unterminated_line(fast_impl):
    mod = fast_impl("chain")
    lines = _journal(3, mod)
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(io.BytesIO(b"".join(lines) + lines[0][:40]))
    assert (info.value.line_no, info.value.reason) == (4, "last line is cut off (no newline)")
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(io.BytesIO(b"".join(lines) + b"x" * (3 << 20)))
    assert (info.value.line_no, info.value.reason) == (4, "line longer than 1048576 bytes")


def test_verify_stream_run_id_must_stay_the_same(fast_impl):
    mod = fast_impl("chain")
    lines = _journal(2, mod)
    intruder = mod.encode_event(TS, "other_run", 1, "generate", "info", "x", "", {}, {}, [], None,
                                hashlib.sha256(lines[-1]).hexdigest())
    with pytest.raises(mod.JournalError) as info:
        mod.verify_stream(io.BytesIO(b"".join(lines) + intruder))
    assert (info.value.line_no, info.value.reason) == (
        3, "run_id 'other_run' differs from the journal's run 'test_cpp_run_123'")


# -- the two twins agree --------------------------------------------------------------------

def _damaged_journals() -> list[bytes]:
    base = _journal(6)
    data = b"".join(base)
    out = [data, b"", b"\n", data + b"\n", data + b"garbage", data + b"garbage\n",
           b"".join(base[:2] + base[3:]), b"".join([base[1], base[0]] + base[2:]),
           b"".join(base[:3] + [base[2]] + base[3:]), data[:-1], data[:-30],
           data.replace(b'"round":1', b'"round": 1', 1), data.replace(b"1.5", b"NaN"),
           data.replace(b"1.5", b"Infinity"), data.replace(b"message 4", b"m\xffssage 4"),
           data.replace(b"1.0", b"2.0", 1), data.replace(b'"level":"info"', b'"level":"loud"'),
           data.replace(b"{", b"[", 1), b"[]\n" + data, data + b"{}\n"]
    for i in range(0, len(data), 97):  # flip one byte everywhere
        out.append(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    return out


def _verdict(mod, data: bytes):
    try:
        return ("ok",) + tuple(mod.verify_stream(io.BytesIO(data)))
    except mod.JournalError as exc:
        return ("error", exc.line_no, exc.reason, str(exc))


def _compiled_chain():
    try:
        return importlib.import_module("heidi._fast._chain_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._chain_c not built: {exc}")


def test_twins_give_identical_verdicts():
    c = _compiled_chain()
    py = importlib.import_module("heidi._fast._chain_py")
    corpus = _damaged_journals()
    verdicts = [_verdict(py, d) for d in corpus]
    assert [_verdict(c, d) for d in corpus] == verdicts
    assert verdicts[0][:2] == ("ok", 6) and verdicts[1] == ("ok", 0, None, None)
    assert sum(v[0] == "error" for v in verdicts) >= len(corpus) - 8
    for data in corpus:
        for line in data.splitlines(keepends=True)[:3]:
            assert py.parse_line(line)[1] == c.parse_line(line)[1]
            for prev in (None, RUN, _H):
                try:
                    a = py.check_line(line, prev, None)
                except ValueError as exc:
                    a = str(exc)
                try:
                    b = c.check_line(line, prev, None)
                except ValueError as exc:
                    b = str(exc)
                assert a == b


def test_both_twins_raise_one_journal_error_class():
    """A caller catching heidi.JournalError catches it whichever twin is in use."""
    import heidi._fast._chain_py as py
    c = pytest.importorskip("heidi._fast._chain_c")
    assert py.JournalError is c.JournalError is heidi.JournalError


# -- emit_line: the writer's per-event path, the same in both twins --------------------------

def _redact_marked(text: str) -> str:
    return text.replace("sk-secret", "[REDACTED]")


EMIT_CASES = {
    "plain": dict(message="Starting teacher generation"),
    "usage and counters": dict(message="train succeeded", level="success",
                               counters_delta={"lines": 3, "bad": 0},
                               usage_delta={"wall_ms": 12.5, "peak_rss_bytes": 1 << 40,
                                            "cpu_pct": -0.0}),
    "non-str keys": dict(usage_delta={1: 2.0}, counters_delta={("a",): 1}),
    "secret everywhere": dict(message="key sk-secret", error="bad sk-secret",
                              artifact_paths=["/out/sk-secret/model.bin"]),
    "long text": dict(message="m" * 600, error="e" * 300,
                      artifact_paths=["/" + "p" * 150, "/short", 42]),
    "not ascii": dict(message="d\u00e9j\u00e0 vu \udcff", error=ValueError("caf\u00e9 \udc80"),
                      artifact_paths=["/data/\udcffname"]),
    "subclass of dict": dict(usage_delta=type("D", (dict,), {})(wall_s=1)),
}


@pytest.mark.parametrize("case", sorted(EMIT_CASES))
def test_emit_line_twins_agree_and_line_is_its_event(case):
    py = importlib.import_module("heidi._fast._chain_py")
    try:
        c = importlib.import_module("heidi._fast._chain_c")
    except ImportError:
        pytest.skip("compiled chain twin not built")
    kw = {"message": "", "level": "info", "counters_delta": None, "usage_delta": None,
          "artifact_paths": None, "error": None, **EMIT_CASES[case]}

    def call(mod):
        return mod.emit_line(TS, RUN, 2, "train", kw["level"], "script_success", kw["message"],
                             kw["counters_delta"], kw["usage_delta"], kw["artifact_paths"],
                             kw["error"], VECTOR_HASH_1, _redact_marked)
    (e_py, line_py, hash_py), (e_c, line_c, hash_c) = call(py), call(c)
    assert line_c == line_py and hash_c == hash_py and e_c == e_py
    assert list(e_c) == list(KEYS)
    assert line_py == orjson.dumps(e_py) + b"\n"
    assert hash_py == hashlib.sha256(line_py).hexdigest()
    event = orjson.loads(line_py)
    assert len(event["message"]) <= 500 and "sk-secret" not in line_py.decode()
    assert event["error"] is None or len(event["error"]) <= 200
    assert all(len(p) <= 100 for p in event["artifact_paths"])
    assert py.check_line(line_py, VECTOR_HASH_1, RUN)["event_type"] == "script_success"


@pytest.mark.parametrize("bad, exc, words", [
    (dict(level="fatal"), ValueError, "level 'fatal': must be one of critical, error, info"),
    (dict(usage_delta={"wall_s": float("nan")}), ValueError, "usage_delta['wall_s'] must be finite"),
    (dict(counters_delta={"n": True}), TypeError, "counters_delta['n'] must be a number, not bool"),
    (dict(usage_delta={"x": "1"}), TypeError, "usage_delta['x'] must be a number, not str"),
])
def test_emit_line_refuses_bad_fields_alike(fast_impl, bad, exc, words):
    mod = fast_impl("chain")
    kw = {"level": "info", "usage_delta": None, "counters_delta": None, **bad}
    with pytest.raises(exc) as info:
        mod.emit_line(TS, RUN, 1, "train", kw["level"], "x", "m", kw["counters_delta"],
                      kw["usage_delta"], None, None, RUN, _redact_marked)
    assert words in str(info.value)


def test_journal_writer_runs_on_the_twin_under_test(twin, tmp_path):
    """The `twin` fixture reaches the chain functions journal.py looked up lazily."""
    from heidi import journal
    writer = journal.JournalWriter(str(tmp_path / "events.jsonl"), RUN, batch=False, fsync=False)
    writer.emit("pipeline_start", "x")
    writer.close()
    expected = importlib.import_module(f"heidi._fast._chain_{twin}").emit_line
    assert journal._chain.emit_line is expected
