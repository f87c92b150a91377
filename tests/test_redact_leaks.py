"""The ways a secret used to slip past redaction: across the 64 KiB cut of a long line, under an
env name not seen as secret, in a connection string, encoded (base64, urlsafe, hex, percent), cut
by the journal's truncation. Tests taking `fast_impl` run against both twins.

Fake credentials are assembled from pieces, so no literal here looks like a live one.
"""
from __future__ import annotations

import base64
import importlib
import os
import random
import string
from urllib.parse import quote, quote_plus

import pytest

from heidi._fast import _redact_rules
from heidi._fast.redact import CUT_OVERLAP_CHARS, LineRedactor
from heidi.stagelog import MAX_LINE_BYTES, StageLog

_rng = random.Random(909)
_ALNUM = string.ascii_letters + string.digits


def _fake(n: int, alphabet: str = _ALNUM) -> str:
    return _rng.choice(string.ascii_letters) + "".join(_rng.choice(alphabet) for _ in range(n - 1))


GH_TOKEN = "ghp_" + _fake(36)


def _value() -> str:
    # Specials, so that its percent-encodings differ from it, and a base64 with "+" and "/", so
    # that the urlsafe one differs too.
    while True:
        value = "Pa55-" + _fake(19, _ALNUM + "?>~") + "/+ x?&="
        b64 = base64.b64encode(value.encode()).decode()
        if "+" in b64 and "/" in b64:
            return value


VALUE = _value()
ENV = {"DB_PASS": VALUE}


def _stable_b64(raw: bytes, offset: int, encode=base64.b64encode) -> str:
    """The characters of base64(offset bytes + raw + more) that only raw's bytes decide."""
    blob = encode(bytes(offset) + raw + b"\xff\xfe").decode()
    first = (8 * offset + 5) // 6          # first char starting at or after raw's first bit
    last = (8 * (offset + len(raw))) // 6  # chars ending at or before raw's last bit
    return blob[first:last]


def _encodings(value: str) -> dict[str, str]:
    raw = value.encode()
    forms = {
        "raw": value,
        "b64": base64.b64encode(raw).decode(),
        "b64_unpadded": base64.b64encode(raw).decode().rstrip("="),
        "urlsafe": base64.urlsafe_b64encode(raw).decode(),
        "urlsafe_unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(), "HEX": raw.hex().upper(),
        "percent": quote(value, safe=""), "percent_slash_safe": quote(value),
        "percent_plus": quote_plus(value), "percent_lower": quote(value, safe="").replace(
            "%2F", "%2f").replace("%2B", "%2b").replace("%3F", "%3f").replace("%3D", "%3d"),
        "percent_every_byte": "".join(f"%{b:02X}" for b in raw),
    }
    assert len(set(forms.values())) == len(forms)
    return forms


# ---- env names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,secret", [
    ("DB_PASS", True), ("SMTP_PASS", True), ("PASS", True), ("db_pass", True),
    ("APP_PASSWD", True), ("SECRETKEY", True), ("DJANGO_SECRETKEY", True), ("SECRETS_JSON", True),
    ("X_KEY_B64", True), ("KEY_B64", True), ("SSH_KEY_ED25519", True), ("AZURE_STORAGE_KEY", True),
    ("HF_TOKEN", True), ("REFRESHTOKEN", True), ("TOKEN_B64", True), ("GCP_CREDENTIAL", True),
    ("CREDENTIALS_JSON", True), ("HEIDI_API_TOKEN", True), ("TEACHER_API_KEY", True),
    # still not secrets
    ("TOKENIZERS_PARALLELISM", False), ("MAX_TOKENS", False), ("NUM_TOKENS", False),
    ("GIT_ASKPASS", False), ("SSH_ASKPASS", False), ("KEYBOARD_LAYOUT", False), ("XAUTHORITY", False),
    ("PASSWORD_FILE", False), ("SSH_KEY_PATH", False), ("PWD", False), ("HOME", False),
])
def test_env_names_that_hold_secrets(name, secret):
    assert _redact_rules.env_name_is_secret(name) is secret


def test_values_of_the_new_secret_names_are_redacted(fast_impl):
    env = {"DB_PASS": "kiwi-" + _fake(12), "SECRETKEY": "lime-" + _fake(16),
           "X_KEY_B64": base64.b64encode(os.urandom(24)).decode(), "SHORT_PASS": "abc1234"}
    redactor = fast_impl("redact").Redactor(env=env)
    out = redactor.redact(f"db {env['DB_PASS']} sk {env['SECRETKEY']} k {env['X_KEY_B64']} "
                          f"short {env['SHORT_PASS']}")
    # Values under ENV_MIN_VALUE_CHARS stay: they would turn up all over a log.
    assert out == "db [ENV_SECRET] sk [ENV_SECRET] k [ENV_SECRET] short abc1234"


# ---- connection strings ------------------------------------------------------------------------

_ACCOUNT_KEY = base64.b64encode(random.Random(3).randbytes(64)).decode()
_SAS_KEY = base64.b64encode(random.Random(4).randbytes(32)).decode()


@pytest.mark.parametrize("text,expected", [
    ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=" + _ACCOUNT_KEY
     + ";EndpointSuffix=core.windows.net",
     ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=[SECRET]"
      ";EndpointSuffix=core.windows.net")),
    ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
     "SharedAccessKey=" + _SAS_KEY,
     ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;"
      "SharedAccessKey=[SECRET]")),
    ("conn: AccountKey=" + _ACCOUNT_KEY + " retrying", "conn: AccountKey=[SECRET] retrying"),
    ("Server=db;User Id=sa;Password=correct horse 42;Database=runs",
     "Server=db;User Id=sa;Password=[SECRET];Database=runs"),
    ("Pwd=two words here;Uid=sa", "Pwd=[SECRET];Uid=sa"),
    ('{"cs": "Driver={ODBC};Server=db;PWD=spaced out pw"}', '{"cs": "Driver={ODBC};Server=db;PWD=[SECRET]"}'),
    # not a `;` list: key_value's rule (the value ends at a space)
    ("password=hunter22 host=db", "password=[SECRET] host=db"),
])
def test_connection_string_secrets(fast_impl, text, expected):
    redactor = fast_impl("redact").Redactor(env={})
    assert redactor.redact(text) == expected
    assert redactor.redact(expected) == expected


# ---- encoded env values ------------------------------------------------------------------------

@pytest.mark.parametrize("form", list(_encodings(VALUE)))
def test_an_env_secret_is_redacted_in_each_encoding(fast_impl, form):
    encoded = _encodings(VALUE)[form]
    out = fast_impl("redact").Redactor(env=ENV).redact(f"payload={{{encoded}}} done")
    assert out == "payload={[ENV_SECRET]} done"


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("urlsafe", [False, True])
def test_an_env_secret_inside_a_longer_base64_blob(fast_impl, offset, urlsafe):
    # base64 of the value depends on where it sits in the blob (offset mod 3): each alignment's
    # stable characters are found; at most 2 characters on each side, shared with the
    # neighbours, are left.
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    redactor = fast_impl("redact").Redactor(env=ENV)
    rng = random.Random(offset)
    prefix, suffix = rng.randbytes(offset), rng.randbytes(7)
    blob = encode(prefix + VALUE.encode() + suffix).decode()
    out = redactor.redact("data:" + blob)
    assert out.count("[ENV_SECRET]") == 1, out
    left, right = out[len("data:"):].split("[ENV_SECRET]")
    assert blob.startswith(left) and blob.endswith(right)
    assert len(left) <= (8 * offset + 5) // 6 + 1
    assert len(right) <= len(blob) - (8 * (offset + len(VALUE))) // 6 + 1
    assert _stable_b64(VALUE.encode(), offset % 3, encode) not in out


def test_every_encoded_form_holds_a_gate_and_short_values_have_none():
    secrets = _redact_rules.env_secrets({"A_TOKEN": VALUE, "B_SECRET": "mango-" + _fake(30),
                                         "C_PASS": "short12", "D_KEY": "12345678901"})
    assert all(any(gate in form for gate in secrets.gates) for form in secrets.forms)
    assert list(secrets.forms) == sorted(secrets.forms, key=lambda f: (-len(f), f))
    assert set(_encodings(VALUE).values()) <= set(secrets.forms)
    assert not any("short12" in form or "12345678901" in form for form in secrets.forms)
    assert min(map(len, secrets.forms)) >= _redact_rules.ENV_MIN_VALUE_CHARS


def test_twins_agree_on_encoded_env_secrets():
    pure = importlib.import_module("heidi._fast._redact_py")
    try:
        compiled = importlib.import_module("heidi._fast._redact_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._redact_c not built: {exc}")
    env = {"DB_PASS": VALUE, "X_KEY_B64": "Ωmega-" + _fake(14)}
    forms = list(_redact_rules.env_secrets(env).forms)
    fragments = forms + [f[: len(f) // 2] for f in forms] + [f[len(f) // 2:] for f in forms] + [
        "\n", " ", "=", "%", "+", "/", "é", "🚀", "password=", "AccountKey=", ";", GH_TOKEN]
    py_redactor, c_redactor = pure.Redactor(env=env), compiled.Redactor(env=env)
    rng = random.Random(5)
    for _ in range(2000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 10)))
        assert c_redactor.redact(text) == py_redactor.redact(text), text
    long_text = "".join(rng.choice(fragments) for _ in range(20000))
    assert c_redactor.redact(long_text) == py_redactor.redact(long_text)


# ---- the 64 KiB cut of a long line --------------------------------------------------------------

def _through_stagelog(data: bytes, redact, chunk: int = 4096) -> bytes:
    log = StageLog(None, redact, tail_bytes=1 << 30)
    for i in range(0, len(data), chunk):
        log.write(data[i:i + chunk])
    log.close()
    return log.tail(1 << 30).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("before_cut", [1, 5, 15, 30, 39, 2000, CUT_OVERLAP_CHARS + 3])
def test_a_token_across_the_line_cut_is_redacted_whole(fast_impl, before_cut):
    # A line with no newline for far more than 64 KiB (a progress bar redrawn with \r): the
    # token starts `before_cut` bytes before the first cut.
    redactor = fast_impl("redact").Redactor(env=ENV)
    head = b"\rstep 1/9 " + b"=" * (MAX_LINE_BYTES - before_cut - 11) + b" "
    assert len(head) + before_cut == MAX_LINE_BYTES
    data = head + GH_TOKEN.encode() + b" " + b"-" * 150_000 + b"\n"
    out = _through_stagelog(data, redactor.redact)
    assert GH_TOKEN.encode() not in out and GH_TOKEN[-12:].encode() not in out
    assert out == data.replace(GH_TOKEN.encode(), b"[GITHUB_TOKEN]")


def test_secrets_all_along_a_long_line_stay_out(fast_impl):
    # Secrets every few hundred bytes: matches reach into every held-back tail, so the cut moves
    # back; every secret and every encoding of the env secret is still redacted.
    redactor = fast_impl("redact").Redactor(env=ENV)
    rng = random.Random(8)
    encodings = list(_encodings(VALUE).values())
    parts = []
    while sum(map(len, parts)) < 400_000:
        parts.append("=" * rng.randint(50, 900) + " ")
        parts.append(rng.choice([GH_TOKEN, "AccountKey=" + _ACCOUNT_KEY] + encodings) + " ")
    data = "".join(parts).encode() + b"\n"
    out = _through_stagelog(data, redactor.redact, chunk=rng.randint(1000, 70_000))
    for secret in [GH_TOKEN, _ACCOUNT_KEY] + encodings:
        assert secret.encode() not in out
    assert out.count(b"[GITHUB_TOKEN]") == data.count(GH_TOKEN.encode())


def test_a_piece_holds_back_its_tail_only_when_nothing_crosses_the_cut():
    redactor = LineRedactor(lambda text: text.replace(GH_TOKEN, "[GITHUB_TOKEN]"))
    text = "a" * 50_000 + " " + GH_TOKEN + " " + "b" * (CUT_OVERLAP_CHARS + 10)
    shown, held = redactor.piece(text)
    assert held == "b" * CUT_OVERLAP_CHARS
    assert shown == "a" * 50_000 + " [GITHUB_TOKEN] " + "b" * 10
    # A match reaching into the tail: the cut moves back to where both sides redact as the
    # whole does, and the token goes, whole, with the held-back tail.
    text = "a" * 50_000 + " " + GH_TOKEN
    shown, held = redactor.piece(text)
    assert len(held) == 2 * CUT_OVERLAP_CHARS and held.endswith(" " + GH_TOKEN)
    assert shown + held == text
    # Half a token at the end (the rest in the next piece) is held back too.
    text = "a" * 50_000 + " " + GH_TOKEN[:20]
    shown, held = redactor.piece(text)
    assert held == text[-CUT_OVERLAP_CHARS:] and shown + held == text


def test_multibyte_text_across_the_cut_keeps_its_bytes(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    data = ("日本語🚀" * 40_000).encode() + b"\xff\xfe raw " + GH_TOKEN.encode() + b"\n"
    out = _through_stagelog(data, redactor.redact, chunk=65_537)
    assert out == data.replace(GH_TOKEN.encode(), b"[GITHUB_TOKEN]").replace(
        b"\xff\xfe", "\ufffd\ufffd".encode())


# ---- the journal: redacted, then cut -----------------------------------------------------------

def test_journal_cuts_a_field_only_after_redacting_it(tmp_path):
    from heidi._fast import chain
    from heidi._fast.redact import Redactor
    from heidi.journal import JournalWriter

    env = {"DB_PASS": VALUE}
    with JournalWriter(str(tmp_path / "events.jsonl"), "run_1", redact=Redactor(env=env).redact,
                       fsync=False) as journal:
        for limit, field in ((chain.MAX_MESSAGE_CHARS, "message"), (chain.MAX_ERROR_CHARS, "error")):
            for at in (limit - 30, limit - 5, limit - 1):
                for secret in (GH_TOKEN, VALUE, _encodings(VALUE)["hex"]):
                    text = "x" * at + " " + secret + " and more"
                    if field == "message":
                        journal.emit("stage_end", text)
                    else:
                        journal.emit("pipeline_error", "failed", error=text)
    data = (tmp_path / "events.jsonl").read_bytes()
    for secret in (GH_TOKEN, VALUE, _encodings(VALUE)["hex"]):
        for n in (8, 12):  # not even a prefix of one survives the cut
            assert secret[:n].encode() not in data, secret
