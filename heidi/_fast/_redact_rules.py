"""The secret-redaction rule table, as data shared by _redact_py and _redact_c.

Each rule is (name, placeholder, keywords, pattern, flags); the comment above RULES is the contract.
"""
from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import NamedTuple

# Contract every rule keeps (tests/test_redact.py checks it, _redact_c relies on it):
# - keywords are lowercase ASCII literals of 2..32 chars, and every match of the pattern contains
#   one of them case-insensitively: a rule whose keywords are all absent cannot match (the
#   gitleaks-style prefilter), so skipping it changes nothing;
# - flags include re.ASCII, so case-insensitivity is ASCII-only, as the compiled prefilter is;
# - only rules named in MULTILINE_RULES may match across "\n", and they come first; every other
#   pattern never consumes "\n" and its lookarounds see "\n" exactly as they see the edge of the
#   text (no "^"/"$"), so it gives the same result on each line alone as on the whole text;
# - a rule's output never re-matches itself: values that already are a placeholder ("[...]") are
#   left alone.
# Rules apply in order: the specific token formats before the generic key/value rules, so that
# `HF_TOKEN=hf_...` says which kind of secret it was; Anthropic before OpenAI (both start "sk-").
# A pattern's named groups `pre` and `post` are kept around the placeholder.

_A = re.ASCII
_AI = re.ASCII | re.IGNORECASE

PEM_BEGIN_PATTERN = r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"
PEM_END_PATTERN = r"-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----"

# CSI (colours, cursor), OSC (titles, hyperlinks) ended by BEL or ST, and the other escapes
# (charset selection, keypad mode, ...). Stripped before any rule runs: a colour code can split a
# token in two.
ANSI_PATTERN = r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[ -/]*[0-~])"

# Key names that announce a secret; the name must END with one of these (so `tokenizer: gpt2`,
# `token_count=12`, `max_tokens=512` and `secret_name: x` are not keys of secrets).
_KEY_WORDS = (
    r"(?:token|secret|passw(?:or)?d|passphrase|pwd|credentials?|auth"
    r"|(?:api|access|private|secret|auth|signing|encryption|master|client|session)[_-]?key)"
)
# Tokenizer settings end in "token" too, and are everywhere in training logs.
_NOT_SPECIAL_TOKEN = (
    r"(?<!pad.token)(?<!eos.token)(?<!bos.token)(?<!unk.token)(?<!sep.token)(?<!cls.token)"
    r"(?<!mask.token)(?<!special.token)"
)
# The value of a secret-named key: quoted (up to the closing quote, spaces allowed) or bare (up to
# whitespace or punctuation that ends values in logs). Not redacted: numbers (`num_tokens: 1234`),
# null/none/true/false, masks (`****`), `<pad>`/`[PAD]`/placeholders, `${VAR}`, {…}/(…), and
# values under 4 chars.
_VALUE = (
    r"(?![<\[{(*]|\$\{)"
    r"(?!(?:null|none|nil|true|false|yes|no|undefined|n/a|[-+]?[0-9][0-9._,:eE+-]*)"
    r"(?:[\s\"',;&})\]]|\Z))"
    r"(?(q)(?:\\.|(?!(?P=q))[^\\\n]){4,}|[^\s\"',;&})\]]{4,})"
    r"(?P<post>(?(q)(?P=q)?))"
)
# Keywords of the two key rules: a key word plus the char that follows it in any match (= : " '
# space tab), so `max_tokens=512`, `tokens/s` and "the tokenizer" do not even wake the rules up.
_KEY_WORD_ENDS = ("token", "secret", "password", "passwd", "passphrase", "pwd", "credential",
                  "credentials", "auth", "key")
_KV_KEYWORDS = tuple(word + sep for word in _KEY_WORD_ENDS for sep in ("=", ":", '"', "'", " ", "\t"))

_PLACEHOLDER_AHEAD = r"(?!\[[A-Z][A-Z_]*\])"

RULES: tuple[tuple[str, str, tuple[str, ...], str, int], ...] = (
    ("private_key", "[PRIVATE_KEY]", ("private key",),
     # Up to the END line (also when the block is one JSON line with literal \n), or, cut off,
     # to the end of the text: half a key is still a key.
     PEM_BEGIN_PATTERN + r"(?:.*?" + PEM_END_PATTERN + r"|.*)", re.DOTALL | _A),
    ("anthropic", "[ANTHROPIC_KEY]", ("sk-ant-",),
     r"sk-ant-[A-Za-z0-9_-]{20,}", _A),
    ("openai", "[OPENAI_KEY]", ("sk-",),
     # Bare sk- keys are alnum only, so prose like "sk-learn-compatible-estimator" is not a key.
     r"(?<![A-Za-z0-9])sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}|[A-Za-z0-9]{20,})", _A),
    ("github", "[GITHUB_TOKEN]", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})", _A),
    ("gitlab", "[GITLAB_TOKEN]", ("glpat-",),
     r"glpat-[A-Za-z0-9_-]{20,}", _A),
    ("slack_webhook", "[SLACK_WEBHOOK]", ("hooks.slack.com",),
     r"https?://hooks\.slack\.com/services/[A-Za-z0-9_/]+", _AI),
    ("slack", "[SLACK_TOKEN]", ("xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-"),
     r"xox[abprs]-[A-Za-z0-9-]{10,}", _A),
    ("stripe", "[STRIPE_KEY]", ("sk_live_", "sk_test_", "rk_live_", "rk_test_"),
     r"[sr]k_(?:live|test)_[A-Za-z0-9]{10,}", _A),
    ("huggingface", "[HF_TOKEN]", ("hf_",),
     r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}", _A),
    ("google_api_key", "[GOOGLE_API_KEY]", ("aiza",),
     r"AIza[0-9A-Za-z_-]{35}", _A),
    ("aws_key_id", "[AWS_KEY]",
     ("akia", "asia", "agpa", "aida", "aroa", "aipa", "anpa", "anva", "apka", "abia", "acca"),
     r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA|ABIA|ACCA)[A-Z0-9]{16}"
     r"(?![A-Z0-9])", _A),
    ("jwt", "[JWT]", ("eyj",),
     r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*", _A),
    ("bearer", "[BEARER_TOKEN]", ("bearer", "authorization"),
     # The value needs a digit or 20+ chars: "Bearer authentication" in prose is not a token.
     r"(?P<pre>\b(?:Bearer|Authorization[ \t]*[:=][ \t]*[\"']?token)[ \t]+)"
     r"(?=[A-Za-z._~+/-]*[0-9]|[A-Za-z0-9._~+/-]{20})[A-Za-z0-9._~+/-]{8,}=*", _AI),
    ("basic_auth", "[BASIC_AUTH]", ("authorization",),
     r"(?P<pre>\bAuthorization[ \t]*[:=][ \t]*[\"']?Basic[ \t]+)[A-Za-z0-9+/]{4,}={0,2}", _AI),
    ("url_password", "[PASSWORD]", ("://",),
     # Starts at the literal "://" (the scheme stays outside the match) so `re` can jump to it.
     # Greedy up to the last "@" before the host: an unescaped "@" in a password stays hidden.
     r"(?P<pre>://(?<=[A-Za-z0-9]://)[^\s:/?#@\"'<>\[\]]*:)" + _PLACEHOLDER_AHEAD
     + r"[^\s/?#\"'<>]+(?P<post>@)", _A),
    ("connection_string", "[SECRET]",
     ("accountkey=", "sharedaccesskey=", "password=", "passwd=", "pwd="),
     # `;`-separated connection strings (ADO.NET, ODBC, Azure Storage and Service Bus):
     # AccountKey= and SharedAccessKey= anywhere, up to `;`, whitespace or a quote; a
     # Password= / Pwd= field of a `;` list up to the next `;` (spaces included), a quote or the
     # end of the line, which key_value (its value ends at a space) would cut short.
     r"(?P<pre>(?:(?<![A-Za-z0-9_.-])(?P<ak>(?:Account|SharedAccess)Key=)"
     r"|(?:;[ \t]*|(?<![A-Za-z0-9_.-])(?=(?:Password|Passwd|Pwd)=[^;\r\n\"']*;))"
     r"(?:Password|Passwd|Pwd)=)[ \t]*+)" + _PLACEHOLDER_AHEAD
     + r"(?(ak)[^;\s\"']+|[^;\r\n\"']+)", _AI),
    ("key_value", "[SECRET]", _KV_KEYWORDS,
     # key=value, key: value, "key": "value", 'key' = 'value'; PWD/OLDPWD are directories.
     r"(?P<pre>(?<![A-Za-z0-9_.-])(?!(?:old)?pwd\b)[A-Za-z0-9_.-]*" + _KEY_WORDS
     + _NOT_SPECIAL_TOKEN + r"[\"']?[ \t]*[:=][ \t]*(?P<q>[\"'])?)" + _VALUE, _AI),
    ("cli_flag", "[SECRET]", _KV_KEYWORDS,
     # --password hunter2, --hf-token 'x y' (the `--flag=value` form is key_value's).
     r"(?P<pre>(?<![A-Za-z0-9_-])--?[A-Za-z0-9_-]*" + _KEY_WORDS + _NOT_SPECIAL_TOKEN
     + r"[ \t]+(?P<q>[\"'])?)(?!-)" + _VALUE, _AI),
)

# Rules whose matches may span lines; they come first in RULES and run on the whole text.
MULTILINE_RULES: tuple[str, ...] = ("private_key",)

PRIVATE_KEY_PLACEHOLDER = "[PRIVATE_KEY]"


# ---- secrets taken from the environment -------------------------------------------------------

ENV_PLACEHOLDER = "[ENV_SECRET]"
# Shorter values (and numbers, booleans) are not redacted literally: they would turn up all over
# a log. Their encodings (below) are at least 10 characters long then.
ENV_MIN_VALUE_CHARS = 8
# Upper-cased variable names whose values are secrets: PASS, SECRET, TOKEN or CREDENTIAL anywhere
# in the name (DB_PASS, SECRETKEY, HF_TOKEN, GCP_CREDENTIALS), _KEY anywhere (X_KEY_B64,
# OPENAI_API_KEY), KEY as the first word, the glued API/ACCESS/PRIVATE KEY (WANDB_APIKEY), and
# AUTH, PWD as words of their own (BASIC_AUTH, MYSQL_PWD; not XAUTHORITY or GIT_AUTHOR_NAME).
ENV_SECRET_NAME_PATTERN = (
    r"PASS|SECRET|TOKEN|CREDENTIAL|_KEY|^KEY(?![A-Z])|(?:API|ACCESS|PRIVATE)_?KEY"
    r"|(?:AUTH|PWD)(?![A-Z])"
)
# Words cut out of a name before it is matched: they hold those letters but name no secret
# (TOKENIZERS_PARALLELISM, MAX_TOKENS and NUM_TOKENS are counts, GIT_ASKPASS is a program).
ENV_NOT_SECRET_WORDS_PATTERN = r"TOKENIZ[A-Z]*|TOKENS(?![A-Z])|ASKPASS|BYPASS|COMPASS|PASSTHR[A-Z]*"
# Their values are file names, sockets, addresses or modes, not secrets (SSH_AUTH_SOCK,
# PASSWORD_FILE, AUTH_URL).
ENV_NOT_SECRET_NAME_PATTERN = r"_(?:FILE|PATH|DIR|SOCK|URL|URI|HOST|ENDPOINT|TYPE|MODE|METHOD)$"
# PWD and OLDPWD are the shell's working directories, not passwords.
ENV_NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})
_ENV_NOT_SECRET_VALUES = frozenset({"true", "false", "none", "null", "undefined"})

_env_secret_name = re.compile(ENV_SECRET_NAME_PATTERN)
_env_not_secret_words = re.compile(ENV_NOT_SECRET_WORDS_PATTERN)
_env_not_secret_name = re.compile(ENV_NOT_SECRET_NAME_PATTERN)


def env_name_is_secret(name: str) -> bool:
    """True when an environment variable called `name` holds a secret by its name."""
    upper = name.upper()
    if upper in ENV_NOT_SECRET_NAMES or _env_not_secret_name.search(upper):
        return False
    return _env_secret_name.search(_env_not_secret_words.sub("-", upper)) is not None


def _hex_lower(match: re.Match[str]) -> str:
    return match.group(0).lower()


def encoded_forms(value: str) -> set[str]:
    """The ways `value` is commonly printed encoded, each as it appears in a longer text.

    base64 and urlsafe base64 of the value alone, padded and not; and, since base64 of bytes
    inside a longer blob depends on their offset mod 3, for offsets 0, 1 and 2 the characters that
    only the value's bytes decide (its partial first and last characters are left out: they
    depend on the neighbours). Hex in lower and upper case. Percent-encoding as quote() and
    quote_plus() give it (nothing safe, or "/" safe), every byte as %XX, each with upper and
    lower case hex digits. Not covered: base64 wrapped over lines, other encodings (gzip, ...),
    partial encodings by other tools, and encodings of encodings.
    """
    from urllib.parse import quote, quote_plus
    raw = value.encode("utf-8", "surrogatepass")
    forms: set[str] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        alone = encode(raw).decode("ascii")
        forms.update((alone, alone.rstrip("=")))
        for offset in (0, 1, 2):
            blob = encode(bytes(offset) + raw).decode("ascii")
            forms.add(blob[-(-4 * offset // 3):(8 * (offset + len(raw))) // 6])
    forms.update((raw.hex(), raw.hex().upper()))
    percent = {quote(value, safe=""), quote(value, safe="/"), quote_plus(value, safe=""),
               quote_plus(value, safe="/"), "".join(f"%{byte:02X}" for byte in raw)}
    forms |= percent | {re.sub(r"%[0-9A-F]{2}", _hex_lower, form) for form in percent}
    forms.discard(value)
    return forms


class EnvSecrets(NamedTuple):
    """What a Redactor replaces literally: `forms` (the secret values and their encodings,
    longest first, so that a value inside another goes last) and `gates` (the fewest of them
    such that every form contains one: none of the gates in a text means no form is in it)."""
    forms: tuple[str, ...]
    gates: tuple[str, ...]


def secret_env_values(env: Mapping[str, object]) -> tuple[str, ...]:
    """The values of `env` whose names look secret (see ENV_SECRET_NAME_PATTERN), longest first."""
    values = set()
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        stripped = value.strip()
        if (len(stripped) < ENV_MIN_VALUE_CHARS or stripped.isdigit()
                or stripped.lower() in _ENV_NOT_SECRET_VALUES or not env_name_is_secret(name)):
            continue
        values.add(value)
        if stripped != value:
            values.add(stripped)
    return tuple(sorted(values, key=lambda v: (-len(v), v)))


def env_secrets(env: Mapping[str, str]) -> EnvSecrets:
    """The literal secrets of `env`: its secret values and their encoded forms."""
    forms: set[str] = set()
    for value in secret_env_values(env):
        forms.add(value)
        forms |= encoded_forms(value.strip())
    ordered = tuple(sorted(forms, key=lambda f: (-len(f), f)))
    gates: list[str] = []
    for form in reversed(ordered):  # shortest first: a longer form holding a gate needs none
        if not any(gate in form for gate in gates):
            gates.append(form)
    return EnvSecrets(ordered, tuple(gates))
