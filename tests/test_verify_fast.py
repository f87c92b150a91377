"""The compiled verify loop's one-pass fast path (heidi/_fast/_jscan.h) says yes only where the
pure twin does: random journals, random damage and random number tokens give the compiled and
the pure `verify_stream` the very same answer (counts, head, run id, or line and reason)."""
from __future__ import annotations

import hashlib
import importlib
import io
import os
import random

import orjson
import pytest

from heidi._fast import _chain_py

RUN = "run_20260220_074538_fast"


@pytest.fixture(scope="module")
def chain_c():
    try:
        return importlib.import_module("heidi._fast._chain_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._chain_c not built: {exc}")


def _answer(module, data: bytes):
    try:
        return module.verify_stream(io.BytesIO(data))
    except module.JournalError as exc:
        return ("error", exc.line_no, exc.reason)


def _same(chain_c, data: bytes):
    fast, pure = _answer(chain_c, data), _answer(_chain_py, data)
    assert fast == pure, data[:300]
    return pure


_ALPHABET = ("abc XYZ 019 \"quoted\" back\\slash /slash \t\n\r\b\f \x00\x01\x1f\x7f é ü ß € 𝄞 "
             "\u2028 \ufeff 日本")


def _text(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(most)))


def _number(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randrange(-10**6, 10**6)
    if kind == 1:
        return rng.choice([0, -1, 2**63 - 1, -2**63, 10**17, 10**18 - 1])
    if kind == 2:
        return round(rng.uniform(-1000, 1000), rng.randrange(0, 8))
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.1 + 0.2, 1e-4, 1.5e-5, 1e-5, 1e15, 1e16, 123456789012345.0,
                           1234567890123456.0, 9999999999999998.0, 2.5, 1e300, 5e-324])
    if kind == 4:
        return rng.uniform(-1, 1) * 10 ** rng.randrange(-8, 20)
    return float(rng.randrange(10**6))


def _journal(rng: random.Random, events: int) -> list[bytes]:
    lines, prev = [], RUN
    for i in range(events):
        line = _chain_py.encode_event(
            f"2026-02-20T07:{i // 60 % 60:02d}:{i % 60:02d}.{rng.randrange(1000):03d}Z", RUN,
            rng.randrange(5), rng.choice(["train", "eval", "pipeline", "a.b-c_d"]),
            rng.choice(sorted(_chain_py.LEVELS)), rng.choice(["stage_end", "x", "round_start"]),
            _text(rng, 60), {_text(rng, 6): _number(rng) for _ in range(rng.randrange(4))},
            {_text(rng, 6): _number(rng) for _ in range(rng.randrange(4))},
            [_text(rng, 30) for _ in range(rng.randrange(3))],
            rng.choice([None, _text(rng, 40)]), prev)
        lines.append(line)
        prev = hashlib.sha256(line).hexdigest()
    return lines


def test_valid_random_journals_agree(chain_c):
    rng = random.Random(11)
    for _ in range(30):
        lines = _journal(rng, rng.randrange(1, 40))
        count, head, run_id = _same(chain_c, b"".join(lines))
        assert (count, run_id) == (len(lines), RUN)
        assert head == hashlib.sha256(lines[-1]).hexdigest()


_EDITS = [
    lambda b, i: b[:i] + b[i + 1:],                                   # a byte gone
    lambda b, i: b[:i] + b" " + b[i:],                                # whitespace
    lambda b, i: b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:],            # a bit flipped
    lambda b, i: b[:i] + bytes([b[i] ^ 0x20]) + b[i + 1:],            # case changed
    lambda b, i: b[:i] + b"0" + b[i:],                                # a digit added
    lambda b, i: b[:i] + b"\\" + b[i:],                               # a backslash
    lambda b, i: b[:i] + b"\xc3" + b[i:],                             # broken UTF-8
    lambda b, i: b[:i] + b"\xed\xa0\x80" + b[i:],                     # an encoded surrogate
]


def test_damaged_journals_agree(chain_c):
    rng = random.Random(12)
    for _ in range(400):
        lines = _journal(rng, rng.randrange(2, 6))
        k = rng.randrange(len(lines))
        body = lines[k][:-1]
        i = rng.randrange(len(body))
        lines[k] = rng.choice(_EDITS)(body, i) + b"\n"
        _same(chain_c, b"".join(lines))


@pytest.mark.parametrize("swap", [(b'"1.0"', b'"1.00"'), (b'\\u000b', b'\\u000B'),
                                  (b'\\n', b'\\u000a'), (b"/", b"\\/"), (b'e\xcc\x81', b'\\u00e9'),
                                  (b'"x":1', b'"x":1,"x":1'), (b'"x":1', b'"x":1.0e0')])
def test_equivalent_but_not_canonical_agree(chain_c, swap):
    line = _chain_py.encode_event("2026-02-20T07:45:38.307Z", RUN, 1, "train", "info", "x",
                                  "a/b\ne\u0301 \x0b", {"x": 1}, {"y": 1.0}, [], None, RUN)
    old, new = swap
    assert old in line
    assert _same(chain_c, line.replace(old, new, 1))[0] == "error"


def _token_line(token: bytes) -> bytes:
    head = _chain_py.encode_event("2026-02-20T07:45:38.307Z", RUN, 1, "train", "info", "x", "m",
                                  {}, {"v": 0}, [], None, RUN)
    return head.replace(b'"usage_delta":{"v":0}', b'"usage_delta":{"v":' + token + b"}")


def test_number_tokens_agree(chain_c):
    """Every number the fast path accepts is one orjson writes back byte for byte."""
    rng = random.Random(13)
    tokens = {orjson.dumps(_number(rng)) for _ in range(3000)}
    for _ in range(6000):
        sign = rng.choice([b"", b"", b"-"])
        whole = rng.choice([b"0", b"00", b"01"] + [str(rng.randrange(10 ** rng.randrange(1, 21))).encode()])
        frac = rng.choice([b"", b"." + str(rng.randrange(10 ** rng.randrange(1, 19))).encode(),
                           b"." + b"0" * rng.randrange(1, 6) + str(rng.randrange(1, 1000)).encode(),
                           b".0", b".50", b".000"])
        exp = rng.choice([b"", b"", b"", b"e5", b"E-3", b"e+02"])
        tokens.add(sign + whole + frac + exp)
    accepted = 0
    for token in sorted(tokens):
        answer = _same(chain_c, _token_line(token))
        accepted += answer[0] == 1
    assert accepted > 1000  # the comparison is not vacuous
