"""Secret redaction: every rule family, the clean corpus, env secrets, ANSI, PEM streams, both twins.

Tests taking `fast_impl` run against _redact_py and _redact_c. Fake credentials are assembled here
from pieces, so no literal in the repository looks like a live one to a secret scanner.
"""
from __future__ import annotations

import base64
import importlib
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from heidi._fast import _redact_rules
from heidi._fast.redact import KEY_BLOCK_MAX_CHARS, redact_lines
from heidi.stagelog import StageLog

ROOT = Path(__file__).resolve().parent.parent
CLEAN_CORPUS = (Path(__file__).parent / "data" / "redact_clean.txt").read_text(encoding="utf-8")

_rng = random.Random(20260220)
_ALNUM = string.ascii_letters + string.digits
_UPPER_DIGITS = string.ascii_uppercase + string.digits
_URLSAFE = _ALNUM + "_-"


def _fake(n: int, alphabet: str = _ALNUM) -> str:
    # Starts with a letter: a value that happens to look numeric would rightly be left alone.
    return _rng.choice(string.ascii_letters) + "".join(_rng.choice(alphabet) for _ in range(n - 1))


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_PEM_BODY = [base64.b64encode(_rng.randbytes(48)).decode() for _ in range(4)]
_JWT = ".".join((_b64url(b'{"alg":"HS256","typ":"JWT"}'),
                 _b64url(b'{"sub":"heidi-ci","iat":1771573538}'), _b64url(_rng.randbytes(32))))

# (id, text before, the secret, text after, placeholder): redact(before + secret + after) must be
# exactly before + placeholder + after.
SECRET_CASES = [
    ("github_ghp", "push with ", "ghp_" + _fake(36), " to origin", "[GITHUB_TOKEN]"),
    ("github_gho", "oauth=", "gho_" + _fake(36), "", "[GITHUB_TOKEN]"),
    ("github_ghu", "user-to-server ", "ghu_" + _fake(36), ".", "[GITHUB_TOKEN]"),
    ("github_ghs", "https://x-access-token:", "ghs_" + _fake(36), "@github.com/o/r.git",
     "[GITHUB_TOKEN]"),
    ("github_ghr", "refresh ", "ghr_" + _fake(36), " done", "[GITHUB_TOKEN]"),
    ("github_pat", "GITHUB_PAT ", "github_pat_" + _fake(22) + "_" + _fake(59), " end",
     "[GITHUB_TOKEN]"),
    ("gitlab", "gitlab ", "glpat-" + _fake(20, _URLSAFE), " expired", "[GITLAB_TOKEN]"),
    ("openai_legacy", "OPENAI_API_KEY=", "sk-" + _fake(48), "", "[OPENAI_KEY]"),
    ("openai_proj", "using ", "sk-proj-" + _fake(120, _URLSAFE) + "A", " for evals", "[OPENAI_KEY]"),
    ("openai_svcacct", "svc ", "sk-svcacct-" + _fake(60, _URLSAFE) + "A", " ok", "[OPENAI_KEY]"),
    ("openai_admin", "admin ", "sk-admin-" + _fake(60, _URLSAFE) + "A", " ok", "[OPENAI_KEY]"),
    ("anthropic", "x-api-key: ", "sk-ant-api03-" + _fake(93, _URLSAFE) + "AA", "", "[ANTHROPIC_KEY]"),
    ("aws_akia", "aws_access_key_id = ", "AKIA" + _fake(16, _UPPER_DIGITS).upper(), "", "[AWS_KEY]"),
    ("aws_asia", "session ", "ASIA" + _fake(16, _UPPER_DIGITS).upper(), " expires", "[AWS_KEY]"),
    ("aws_secret", "aws_secret_access_key = ", _fake(40, _ALNUM + "/+"), "", "[SECRET]"),
    ("slack_token", "SLACK ", "xoxb-" + "1234567890" + "12-" + "9876543210987-" + _fake(24), " ok",
     "[SLACK_TOKEN]"),
    ("slack_webhook", "posting to ", "https://hooks.slack.com/services/T" + _fake(8, _UPPER_DIGITS)
     + "/B" + _fake(8, _UPPER_DIGITS) + "/" + _fake(24), " now", "[SLACK_WEBHOOK]"),
    ("huggingface", "HF_TOKEN=", "hf_" + _fake(34), "", "[HF_TOKEN]"),
    ("google_api_key", "maps ", "AIza" + _fake(35, _URLSAFE), " set", "[GOOGLE_API_KEY]"),
    ("stripe_live", "stripe ", "sk_live_" + _fake(24), " charge", "[STRIPE_KEY]"),
    ("stripe_restricted_test", "stripe ", "rk_test_" + _fake(24), " charge", "[STRIPE_KEY]"),
    ("jwt", "session cookie ", _JWT, "; Path=/", "[JWT]"),
    ("pem_one_line_json", '{"type": "service_account", "private_key": "',
     "-----BEGIN PRIVATE KEY-----\\n" + "\\n".join(_PEM_BODY) + "\\n-----END PRIVATE KEY-----",
     '\\n", "client_email": "svc@proj.iam.gserviceaccount.com"}', "[PRIVATE_KEY]"),
    ("pem_multi_line_text", "key file:\n",
     "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(_PEM_BODY) + "\n-----END OPENSSH PRIVATE KEY-----",
     "\nnext line", "[PRIVATE_KEY]"),
    ("pem_no_end", "leaked: ", "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(_PEM_BODY) + "\n", "",
     "[PRIVATE_KEY]"),
    ("bearer_header", "curl -H 'Authorization: Bearer ", _fake(40, _ALNUM + "._-") + "Z",
     "' https://api.example.com/v1", "[BEARER_TOKEN]"),
    ("bearer_bare", "forwarding Bearer ", "a1" + _fake(30), " upstream", "[BEARER_TOKEN]"),
    ("authorization_token", "Authorization: token ", "t0" + _fake(30), "", "[BEARER_TOKEN]"),
    ("basic_auth", "Authorization: Basic ", base64.b64encode(b"trainer:" + _fake(12).encode()).decode(),
     "", "[BASIC_AUTH]"),
    ("url_password", "DATABASE_URL=postgres://trainer:", _fake(16), "@db.internal:5432/runs",
     "[PASSWORD]"),
    ("url_password_with_at", "redis://:", "p@" + _fake(12), "@cache:6379/0", "[PASSWORD]"),
    ("kv_equals", "db_password=", _fake(14), " host=db", "[SECRET]"),
    ("kv_colon", "client_secret: ", _fake(32), "", "[SECRET]"),
    ("kv_json", '{"api_key": "', _fake(32), '", "model": "gpt-4o"}', "[SECRET]"),
    ("kv_json_spaces", '{"passphrase": "', "correct horse battery staple", '"}', "[SECRET]"),
    ("kv_single_quoted", "{'auth_token': '", _fake(24), "'}", "[SECRET]"),
    ("kv_url_query", "GET /v1/data?access_token=", _fake(24), "&page=2", "[SECRET]"),
    ("kv_header", "X-Api-Key: ", _fake(24), "", "[SECRET]"),
    ("kv_env_style", "export WANDB_API_KEY=", _fake(40, "0123456789abcdef"), "", "[SECRET]"),
    ("kv_pwd", "MYSQL_PWD=", _fake(12), "", "[SECRET]"),
    ("cli_flag", "launch --hf-token ", _fake(24), " --max-tokens 512", "[SECRET]"),
    ("cli_flag_password", "mysql --password ", _fake(12), " -h db", "[SECRET]"),
]


def _reference_redact(text: str, env_values: tuple[str, ...] = ()) -> str:
    """The rule list applied with `re` one pattern at a time, no keyword prefilter."""
    text = re.sub(_redact_rules.ANSI_PATTERN, "", text)
    for value in env_values:
        text = text.replace(value, _redact_rules.ENV_PLACEHOLDER)
    for _name, placeholder, _keywords, pattern, flags in _redact_rules.RULES:
        regex = re.compile(pattern, flags)
        template = (r"\g<pre>" if "pre" in regex.groupindex else "") + placeholder + (
            r"\g<post>" if "post" in regex.groupindex else "")
        text = regex.sub(template, text)
    return text


def _mixed_corpus() -> list[str]:
    """Texts mixing clean lines, secrets, ANSI, non-ASCII and CRLF, as stage output looks."""
    clean = CLEAN_CORPUS.splitlines()
    secret_lines = [before + secret + after for _, before, secret, after, _ in SECRET_CASES]
    rng = random.Random(7)
    texts = list(clean) + secret_lines
    for _ in range(60):
        lines = rng.sample(clean, 8) + rng.sample(secret_lines, 3)
        rng.shuffle(lines)
        decorated = []
        for line in lines:
            roll = rng.random()
            if roll < 0.15:
                line = "\x1b[32m" + line + "\x1b[0m"
            elif roll < 0.25:
                line = "Ωmega→ " + line + " 🚀"
            elif roll < 0.3:
                line = line.upper()
            decorated.append(line)
        texts.append(("\r\n" if rng.random() < 0.2 else "\n").join(decorated))
    texts.append("\n".join(secret_lines))
    texts.append("".join(secret_lines))  # secrets glued together, no line breaks
    texts.append("\x1b]8;;https://u:" + _fake(10) + "@h/\x07link\x1b]8;;\x07 \x1b[1;31mERR\x1b[0m")
    return texts


# ---- rule table --------------------------------------------------------------------------------

def test_rule_table_keeps_the_prefilter_contract():
    names = [rule[0] for rule in _redact_rules.RULES]
    assert len(names) == len(set(names))
    multiline = [name for name in names if name in _redact_rules.MULTILINE_RULES]
    assert names[:len(multiline)] == multiline, "multi-line rules must come first"
    for name, placeholder, keywords, pattern, flags in _redact_rules.RULES:
        assert re.fullmatch(r"\[[A-Z_]+\]", placeholder), name
        assert flags & re.ASCII, f"{name}: case folding must be ASCII-only, like the C prefilter"
        assert keywords, name
        for keyword in keywords:
            assert keyword.isascii() and keyword == keyword.lower() and 2 <= len(keyword) <= 32
        re.compile(pattern, flags)


def test_every_match_contains_a_keyword_and_line_rules_stay_on_one_line():
    # Soundness of the prefilter on real matches: skipping a rule whose keywords are absent
    # can never skip a match; and line rules can be run line by line.
    texts = _mixed_corpus()
    for name, _placeholder, keywords, pattern, flags in _redact_rules.RULES:
        regex = re.compile(pattern, flags)
        for text in texts:
            for match in regex.finditer(re.sub(_redact_rules.ANSI_PATTERN, "", text)):
                found = match.group(0).lower()
                assert any(keyword in found for keyword in keywords), (name, found)
                if name not in _redact_rules.MULTILINE_RULES:
                    assert "\n" not in found, (name, found)


def test_rule_names_and_placeholders(fast_impl):
    mod = fast_impl("redact")
    assert tuple(rule[0] for rule in _redact_rules.RULES) == mod.RULE_NAMES
    assert {rule[1] for rule in _redact_rules.RULES} == {
        "[PRIVATE_KEY]", "[ANTHROPIC_KEY]", "[OPENAI_KEY]", "[GITHUB_TOKEN]", "[GITLAB_TOKEN]",
        "[SLACK_WEBHOOK]", "[SLACK_TOKEN]", "[STRIPE_KEY]", "[HF_TOKEN]", "[GOOGLE_API_KEY]",
        "[AWS_KEY]", "[JWT]", "[BEARER_TOKEN]", "[BASIC_AUTH]", "[PASSWORD]", "[SECRET]"}


# ---- secrets out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("before,secret,after,placeholder",
                         [case[1:] for case in SECRET_CASES], ids=[case[0] for case in SECRET_CASES])
def test_each_rule_family_is_redacted_in_place(fast_impl, before, secret, after, placeholder):
    mod = fast_impl("redact")
    out = mod.Redactor(env={}).redact(before + secret + after)
    assert out == before + placeholder + after
    assert secret not in out


def test_walkthrough_github_token_and_openai_key(fast_impl):
    mod = fast_impl("redact")
    github, openai = "ghp_" + _fake(36), "sk-" + _fake(48)
    text = f"teacher call failed: token {github} rejected, retrying with {openai} (round 2)"
    out = mod.Redactor(env={}).redact(text)
    assert out == "teacher call failed: token [GITHUB_TOKEN] rejected, retrying with [OPENAI_KEY] (round 2)"


def test_anthropic_key_is_not_called_an_openai_key(fast_impl):
    mod = fast_impl("redact")
    key = "sk-ant-api03-" + _fake(93, _URLSAFE) + "AA"
    out = mod.Redactor(env={}).redact(f"ANTHROPIC_API_KEY={key}\n")
    assert out == "ANTHROPIC_API_KEY=[ANTHROPIC_KEY]\n"
    assert "[OPENAI_KEY]" not in out


def test_one_line_pem_with_literal_backslash_n_is_caught(fast_impl):
    mod = fast_impl("redact")
    body = "\\n".join(_PEM_BODY)
    text = ('{"event": "creds", "key": "-----BEGIN EC PRIVATE KEY-----\\n' + body
            + '\\n-----END EC PRIVATE KEY-----\\n", "n": 1}\n')
    out = mod.Redactor(env={}).redact(text)
    assert out == '{"event": "creds", "key": "[PRIVATE_KEY]\\n", "n": 1}\n'
    assert all(part not in out for part in _PEM_BODY)


def test_pem_begin_without_end_redacts_to_the_end_of_the_text(fast_impl):
    mod = fast_impl("redact")
    text = "before\n-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(_PEM_BODY[:2])
    assert mod.Redactor(env={}).redact(text) == "before\n[PRIVATE_KEY]"


def test_secrets_next_to_each_other_and_repeated(fast_impl):
    mod = fast_impl("redact")
    github, hf = "ghp_" + _fake(36), "hf_" + _fake(34)
    text = f"{github},{hf};{github}\n{hf}"
    assert mod.Redactor(env={}).redact(text) == "[GITHUB_TOKEN],[HF_TOKEN];[GITHUB_TOKEN]\n[HF_TOKEN]"


def test_redacting_twice_changes_nothing_more(fast_impl):
    # Placeholders never look like secrets themselves: a redacted journal line stays as it is.
    redactor = fast_impl("redact").Redactor(env={})
    for text in _mixed_corpus():
        once = redactor.redact(text)
        assert redactor.redact(once) == once


# ---- clean text in, same text out ----------------------------------------------------------------

def test_clean_corpus_passes_byte_for_byte(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    for line in CLEAN_CORPUS.splitlines(keepends=True):
        assert redactor.redact(line) == line
    # Clean text comes back as the very same object: nothing was copied.
    assert redactor.redact(CLEAN_CORPUS) is CLEAN_CORPUS


def test_non_str_is_refused(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    with pytest.raises(TypeError, match="takes str"):
        redactor.redact(b"ghp_x")


# ---- environment secrets -------------------------------------------------------------------------

def test_env_secret_values_are_redacted_anywhere(fast_impl):
    mod = fast_impl("redact")
    token, password, key = "mango-" + _fake(12), _fake(10) + "!#", "kiwi" + _fake(20)
    env = {"MY_SERVICE_TOKEN": token, "DB_PASSWORD": password, "TEACHER_API_KEY": key,
           "PWD": "/home/ml/project", "OLDPWD": "/home/ml/old-project",
           "TOKENIZERS_PARALLELISM": "false", "SHORT_SECRET": "abc", "HOME": "/home/ml",
           "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "GIT_AUTHOR_NAME": "Heidi Dang Engineer",
           "RETRY_TOKEN": "123456789"}
    redactor = mod.Redactor(env=env)
    text = (f"cwd /home/ml/project (was /home/ml/old-project) by Heidi Dang Engineer\n"
            f"dsn mysql://ml@db/x?pw={password}&t=1 path=/tmp/{token}/x key{key}suffix\n"
            f"retries 123456789 socket /tmp/ssh-agent.sock parallelism false\n")
    out = redactor.redact(text)
    assert out == ("cwd /home/ml/project (was /home/ml/old-project) by Heidi Dang Engineer\n"
                   "dsn mysql://ml@db/x?pw=[ENV_SECRET]&t=1 path=/tmp/[ENV_SECRET]/x "
                   "key[ENV_SECRET]suffix\n"
                   "retries 123456789 socket /tmp/ssh-agent.sock parallelism false\n")


def test_env_secret_that_a_rule_would_cut_short_goes_whole(fast_impl):
    # Env values go first: a rule matching only part of the value must not leave a tail behind.
    mod = fast_impl("redact")
    value = "hunter22 with spaces"
    out = mod.Redactor(env={"ADMIN_PASSWORD": value}).redact(f"password={value}")
    assert out == "password=[ENV_SECRET]"


def test_default_redactor_reads_os_environ_and_resets(fast_impl, monkeypatch):
    mod = fast_impl("redact")
    value = "papaya-" + _fake(16)
    monkeypatch.setenv("HEIDI_TEST_TEACHER_TOKEN", value)
    mod.reset_default_redactor()
    try:
        assert mod.default_redactor() is mod.default_redactor()
        assert mod.redact(f"teacher uses {value}") == "teacher uses [ENV_SECRET]"
        monkeypatch.delenv("HEIDI_TEST_TEACHER_TOKEN")
        assert mod.redact(f"teacher uses {value}") == "teacher uses [ENV_SECRET]", "cached"
        mod.reset_default_redactor()
        assert mod.redact(f"teacher uses {value}") == f"teacher uses {value}"
    finally:
        mod.reset_default_redactor()


@pytest.mark.parametrize("name,secret", [
    ("HF_TOKEN", True), ("GITHUB_TOKEN", True), ("NGROK_AUTHTOKEN", True), ("AUTH_TOKEN", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", True), ("OPENAI_API_KEY", True),
    ("WANDB_APIKEY", True), ("DB_PASSWORD", True), ("MYSQL_PWD", True), ("SMTP_PASSWD", True),
    ("GPG_PASSPHRASE", True), ("GCP_CREDENTIALS", True), ("BASIC_AUTH", True),
    ("SIGNING_KEY", True), ("KEY", True), ("db_password", True),
    ("PWD", False), ("OLDPWD", False), ("TOKENIZERS_PARALLELISM", False), ("MAX_TOKENS", False),
    ("GIT_AUTHOR_NAME", False), ("XAUTHORITY", False), ("SSH_AUTH_SOCK", False),
    ("PASSWORD_FILE", False), ("AUTH_URL", False), ("HOME", False), ("KEYBOARD_LAYOUT", False),
])
def test_env_names_that_hold_secrets(name, secret):
    assert _redact_rules.env_name_is_secret(name) is secret


# ---- ANSI ----------------------------------------------------------------------------------------

def test_ansi_escapes_are_stripped(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    text = ("\x1b[1;31mERROR\x1b[0m loss=nan\x1b[K\r\n"
            "\x1b]0;heidi train\x07\x1b]8;;https://wandb.ai/r\x1b\\run\x1b]8;;\x1b\\ \x1b(Bdone\x1b=")
    assert redactor.redact(text) == "ERROR loss=nan\r\nrun done"


def test_colour_codes_cannot_hide_a_token(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    token = "ghp_" + _fake(36)
    out = redactor.redact("token " + token[:10] + "\x1b[1m" + token[10:] + "\x1b[0m!")
    assert out == "token [GITHUB_TOKEN]!"


# ---- streaming -----------------------------------------------------------------------------------

def _pem_lines(kind: str = "OPENSSH") -> list[str]:
    return ([f"-----BEGIN {kind} PRIVATE KEY-----\n"] + [part + "\n" for part in _PEM_BODY]
            + [f"-----END {kind} PRIVATE KEY-----\n"])


def test_redact_lines_replaces_a_multi_line_pem_block_once(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    github = "ghp_" + _fake(36)
    lines = ["starting stage\n", f"token {github}\n"] + _pem_lines() + ["done\n"]
    assert list(redact_lines(lines, redactor.redact)) == [
        "starting stage\n", "token [GITHUB_TOKEN]\n", "[PRIVATE_KEY]\n", "done\n"]


def test_redact_lines_cut_off_block_suppresses_to_the_end(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    lines = ["a\n", "key: -----BEGIN RSA PRIVATE KEY-----\r\n"] + [p + "\r\n" for p in _PEM_BODY]
    assert list(redact_lines(lines, redactor.redact)) == ["a\n", "key: [PRIVATE_KEY]\r\n"]


def _through_stagelog(lines: list[str], redact) -> list[str]:
    """What a stage log keeps of these lines (written in odd-sized chunks)."""
    log = StageLog(None, redact, tail_bytes=1 << 30)
    data = "".join(lines).encode()
    for i in range(0, len(data), 4093):
        log.write(data[i:i + 4093])
    log.close()
    return log.tail(1 << 30).splitlines(keepends=True)


@pytest.mark.parametrize("path", ["redact_lines", "stagelog"])
def test_an_open_key_block_hides_every_line_until_its_end(fast_impl, path):
    # Output interleaved with a key (a progress line, a warning) is hidden too: key lines after
    # it must not leak. One rule for `heidi redact` and for stage logs.
    redactor = fast_impl("redact").Redactor(env={})
    body = [p + "\n" for p in _PEM_BODY]
    lines = (["start\n", "-----BEGIN RSA PRIVATE KEY-----\n"] + body[:2]
             + ["epoch 1 loss=0.5 (interleaved)\n"] + body[2:]
             + ["-----END RSA PRIVATE KEY----- after\n", "done\n"])
    run = (lambda ls: list(redact_lines(ls, redactor.redact))) if path == "redact_lines" else (
        lambda ls: _through_stagelog(ls, redactor.redact))
    assert run(lines) == ["start\n", "[PRIVATE_KEY]\n", " after\n", "done\n"]


@pytest.mark.parametrize("path", ["redact_lines", "stagelog"])
def test_a_key_block_never_closed_hides_a_bounded_amount(fast_impl, path):
    # No END line: lines stay hidden until KEY_BLOCK_MAX_CHARS characters were hidden, then the
    # rest of the stream shows again (a cut-off key must not swallow the rest of a log).
    redactor = fast_impl("redact").Redactor(env={})
    body_line = "A" * 63 + "\n"
    hidden = [body_line] * (KEY_BLOCK_MAX_CHARS // len(body_line))
    later = [f"step {i} password=hunter2-{i}\n" for i in range(3)]
    lines = ["x -----BEGIN OPENSSH PRIVATE KEY-----\n"] + hidden + later
    run = (lambda ls: list(redact_lines(ls, redactor.redact))) if path == "redact_lines" else (
        lambda ls: _through_stagelog(ls, redactor.redact))
    assert run(lines) == ["x [PRIVATE_KEY]\n"] + [
        f"step {i} password=[SECRET]\n" for i in range(3)]
    # Within the bound, it is all hidden.
    assert run(lines[:-3]) == ["x [PRIVATE_KEY]\n"]


def test_redact_lines_keeps_text_after_end_and_catches_the_next_block(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    lines = (["x " + _pem_lines("EC")[0]] + _pem_lines("EC")[1:-1]
             + ["-----END EC PRIVATE KEY----- then password=" + "s3cr3t-value\n"]
             + _pem_lines() + ["", "tail"])
    assert list(redact_lines(lines, redactor.redact)) == [
        "x [PRIVATE_KEY]\n", " then password=[SECRET]\n", "[PRIVATE_KEY]\n", "", "tail"]


def test_redact_lines_streams_lazily(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    consumed = []

    def source():
        for line in ("one\n", "two\n", "three\n"):
            consumed.append(line)
            yield line

    stream = redact_lines(source(), redactor.redact)
    assert next(stream) == "one\n"
    assert consumed == ["one\n"]


def test_redact_lines_one_line_pem_needs_no_state(fast_impl):
    redactor = fast_impl("redact").Redactor(env={})
    one_line = "k=-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END PRIVATE KEY-----\\n\n"
    assert list(redact_lines([one_line, "next\n"], redactor.redact)) == [
        "k=[PRIVATE_KEY]\\n\n", "next\n"]


# ---- the twins agree -----------------------------------------------------------------------------

def test_output_equals_the_rule_list_without_prefilter(fast_impl):
    # The prefilter is only an optimisation: results equal plain per-pattern `re`.
    mod = fast_impl("redact")
    env = {"HEIDI_TEST_TOKEN": "mango-" + _fake(12)}
    redactor = mod.Redactor(env=env)
    for text in _mixed_corpus() + [CLEAN_CORPUS]:
        text = text.replace("task-0001", env["HEIDI_TEST_TOKEN"])
        assert redactor.redact(text) == _reference_redact(text, (env["HEIDI_TEST_TOKEN"],)), text


def test_compiled_and_pure_twins_give_identical_output():
    pure = importlib.import_module("heidi._fast._redact_py")
    try:
        compiled = importlib.import_module("heidi._fast._redact_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._redact_c not built: {exc}")
    env = {"DB_PASSWORD": "mango-" + _fake(12)}
    texts = _mixed_corpus()
    whole = "\n".join(texts) + CLEAN_CORPUS
    py_redactor, c_redactor = pure.Redactor(env=env), compiled.Redactor(env=env)
    for text in texts + [whole, whole.replace("\n", "\r\n"), ""]:
        assert c_redactor.redact(text) == py_redactor.redact(text)
    lines = whole.splitlines(keepends=True) + [line for text in texts for line in _pem_lines()]
    assert (list(redact_lines(lines, c_redactor.redact))
            == list(redact_lines(lines, py_redactor.redact)))
    assert compiled.RULE_NAMES == pure.RULE_NAMES
    assert set(compiled.__all__) == set(pure.__all__)


def test_twins_agree_on_fragment_soup():
    # Random glue of keywords, secrets, line breaks, escapes and non-ASCII (Kelvin sign, long s,
    # dotted I fold to ASCII under Unicode rules): where a per-line C scan and whole-text Python
    # lowercasing could disagree.
    pure = importlib.import_module("heidi._fast._redact_py")
    try:
        compiled = importlib.import_module("heidi._fast._redact_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._redact_c not built: {exc}")
    fragments = ["\n", "\r\n", " ", "=", ":", '"', "'", "\\n", "@", "://", "1234", "[SECRET]",
                 "\x1b[31m", "\x1b]", "é", "日本", "🚀", "to\u212aen", "paſsword", "İ",
                 "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----", "mango-secret-1"]
    for _name, before, secret, after, _placeholder in SECRET_CASES:
        fragments += [before, secret, after, secret[:5], secret[-6:]]
    for rule in _redact_rules.RULES:
        fragments += list(rule[2]) + [keyword.upper() for keyword in rule[2]]
    env = {"X_TOKEN": "mango-secret-1"}
    py_redactor, c_redactor = pure.Redactor(env=env), compiled.Redactor(env=env)
    rng = random.Random(11)
    for _ in range(3000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 12)))
        expected = _reference_redact(text, ("mango-secret-1",))
        assert py_redactor.redact(text) == expected, text
        assert c_redactor.redact(text) == expected, text


# ---- the selector --------------------------------------------------------------------------------

def test_selector_uses_the_compiled_twin_when_built():
    if os.environ.get("HEIDI_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("HEIDI_NO_EXTENSIONS is set")
    try:
        compiled = importlib.import_module("heidi._fast._redact_c")
    except ImportError as exc:
        if os.environ.get("HEIDI_REQUIRE_EXTENSIONS", "") not in ("", "0"):
            raise
        pytest.skip(f"compiled heidi._fast._redact_c not built: {exc}")
    from heidi._fast import redact
    assert redact.COMPILED is True
    assert redact.Redactor is compiled.Redactor
    assert "re" in compiled.HIDDEN_IMPORTS and "heidi._fast._redact_rules" in compiled.HIDDEN_IMPORTS


def test_selector_picks_the_pure_twin_with_heidi_no_extensions():
    env = dict(os.environ, HEIDI_NO_EXTENSIONS="1", PYTHONPATH=str(ROOT))
    code = ("import heidi._fast.redact as r; "
            "print(r.COMPILED, r.Redactor.__module__, r.redact('x ghp_' + 'a' * 36))")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.split() == ["False", "heidi._fast._redact_py", "x", "[GITHUB_TOKEN]"]
