"""The settings table: each variable's attribute, parser and default, and the value parsers
(ranges, choices, URLs, paths, the API token) that give one-line ConfigErrors. config.py builds
Config from it."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from .errors import ConfigError

RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
MODES = ("full", "collect")
PROVIDERS = ("mock", "openai", "anthropic")
STAGES = ("generate", "validate", "test", "train", "eval")
EXECUTORS = ("local", "slurm")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(name: str, raw: Any) -> int:
        try:
            if isinstance(raw, (bool, float)):
                raise ValueError
            value = int(str(raw).strip(), 10)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: must be an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}={raw!r}: must be an integer from {lo} to {hi}")
        return value
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str, Any], float]:
    allowed = f"a number {'above' if lo_open else 'from'} {lo:g} {'and up to' if lo_open else 'to'} {hi:g}"

    def parse(name: str, raw: Any) -> float:
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = float(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: must be {allowed}") from None
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            raise ConfigError(f"{name}={raw!r}: must be {allowed}")
        return value
    return parse


def _bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: must be 1 or 0 (or true/false, yes/no, on/off)")


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, raw: Any) -> str:
        value = str(raw).strip()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
        return value
    return parse


def _text(max_len: int = 4096) -> Callable[[str, Any], str]:
    def parse(name: str, raw: Any) -> str:
        if not isinstance(raw, str) or not raw.strip() or len(raw) > max_len or "\0" in raw:
            raise ConfigError(f"{name}={raw!r}: must be a non-empty string of at most {max_len} characters")
        return raw.strip()
    return parse


def _run_id(name: str, raw: Any) -> str | None:
    value = str(raw)
    if value == "":
        return None
    if not RUN_ID_RE.match(value) or value in (".", ".."):
        raise ConfigError(f"{name}={raw!r}: must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def _path(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
        raise ConfigError(f"{name}={raw!r}: must be a directory path")
    return os.path.abspath(os.path.expanduser(raw.strip()))


def _url(name: str, raw: Any) -> str:
    from urllib.parse import urlsplit
    value = _text(2048)(name, raw)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.username or parts.password or parts.query or parts.fragment:
        # The value may carry a credential (https://user:key@host): never echo it.
        raise ConfigError(f"{name}: must be an http:// or https:// URL with a host, without "
                          "credentials, query or fragment")
    return value


def _out_dir(name: str, raw: Any) -> str:
    """OUT_DIR: any directory but / and the home directory itself (compared as real paths).

    heidi shares OUT_DIR with whatever else is there and archives only its own files, but a run
    spread over / or ~ would mix its logs/ and data/ with the whole system's or the user's own."""
    path = _path(name, raw)
    real = os.path.realpath(path)
    home = os.path.expanduser("~")
    if real == os.path.realpath(os.sep):
        raise ConfigError(f"{name}={raw!r}: must not be / (give a directory of its own, e.g. ~/heidi-run)")
    if home not in ("", "~") and real == os.path.realpath(home):
        raise ConfigError(f"{name}={raw!r}: must not be the home directory itself "
                          "(give a directory of its own, e.g. ~/heidi-run)")
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(f"{name}={raw!r}: is a file, not a directory (give a directory, "
                          "existing or to be made)")
    return path


TOKEN_MIN_LEN = 16


def _token(name: str, raw: Any) -> str:
    """The API token: 16 to 4096 visible ASCII characters. HTTP headers arrive as bytes (latin-1
    in practice), so only ASCII compares the same on every client; the value is never echoed."""
    value = str(raw).strip() if isinstance(raw, str) else None
    rule = (f"must be {TOKEN_MIN_LEN} to 4096 printable ASCII characters (letters, digits, "
            "punctuation; no spaces); unset it for no token")
    if value is None or not value:
        problem = "empty" if value is not None else "not a string"
    elif not value.isascii():
        problem = "has a non-ASCII character"
    elif not all("!" <= ch <= "~" for ch in value):
        problem = "has a space or control character"
    elif not TOKEN_MIN_LEN <= len(value) <= 4096:
        problem = f"has {len(value)} characters"
    else:
        return value
    raise ConfigError(f"{name}: {problem}; {rule}")


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def wrapped(name: str, raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            return None
        return parse(name, raw)
    return wrapped


# name: (attribute, parser, default). Ranges are generous: they catch garbage, not ambition.
SETTINGS: dict[str, tuple[str, Callable[[str, Any], Any], Any]] = {
    "RUN_ID": ("run_id", _run_id, None),
    "OUT_DIR": ("out_dir", _out_dir, "~/.local/heidi_engine"),
    "HEIDI_REPO_ROOT": ("repo_root", _path, None),
    "HEIDI_MODE": ("mode", one_of(*MODES), "full"),
    "ROUNDS": ("rounds", _int(1, 1_000_000), 3),
    "SAMPLES_PER_ROUND": ("samples_per_round", _int(1, 100_000_000), 50),
    "VAL_RATIO": ("val_ratio", float_in(0.0, 0.9), 0.1),
    "RUN_UNIT_TESTS": ("run_unit_tests", _bool, False),
    "HEIDI_MOCK_SUBPROCESSES": ("mock_subprocesses", _bool, False),
    "MAX_WALL_TIME_MINUTES": ("max_wall_time_minutes", float_in(0.0, 525_600.0, lo_open=True), 60.0),
    "MAX_CPU_PCT": ("max_cpu_pct", float_in(1.0, 100.0), 95.0),
    "MAX_MEM_PCT": ("max_mem_pct", float_in(1.0, 100.0), 90.0),
    "BASE_MODEL": ("base_model", _text(), "microsoft/phi-2"),
    "TEACHER_MODEL": ("teacher_model", _text(), "gpt-4o-mini"),
    "SEQ_LEN": ("seq_len", _int(1, 10_485_760), 2048),
    "BATCH_SIZE": ("batch_size", _int(1, 1_000_000), 1),
    "GRAD_ACCUM": ("grad_accum", _int(1, 1_000_000), 8),
    "TRAIN_STEPS": ("train_steps", _int(1, 1_000_000_000), 500),
    "LORA_R": ("lora_r", _int(1, 65_536), 64),
    "LORA_ALPHA": ("lora_alpha", _int(1, 1_000_000), 128),
    "LR": ("lr", float_in(0.0, 10.0, lo_open=True), 2e-4),
    "SEED": ("seed", _int(0, 2**32 - 1), 42),
    "HEIDI_PYTHON": ("python", _text(), "python3"),
    "HEIDI_FSYNC": ("fsync", _bool, True),
    "HEIDI_STAGE_TIMEOUT_S": ("stage_timeout_s", _optional(float_in(0.0, 31_536_000.0, lo_open=True)), None),
    "HEIDI_KILL_GRACE_S": ("kill_grace_s", float_in(0.0, 3600.0), 5.0),
    "HEIDI_EXECUTOR": ("executor", one_of(*EXECUTORS), "local"),
    "HEIDI_SLURM_POLL_S": ("slurm_poll_s", float_in(0.0, 3600.0, lo_open=True), 1.0),
    "HEIDI_MAX_FDS": ("max_fds", _optional(_int(16, 1 << 30)), None),
    "HEIDI_MAX_CPU_S": ("max_cpu_s", _optional(_int(1, 1 << 40)), None),
    "HEIDI_MAX_MEMORY_MB": ("max_memory_mb", _optional(_int(16, 1 << 40)), None),
    "HEIDI_HOST": ("host", _text(255), "127.0.0.1"),
    "HEIDI_PORT": ("port", _int(0, 65535), 8080),
    "HEIDI_API_TOKEN": ("api_token", _token, None),
    "HEIDI_API_REQUEST_TIMEOUT_S": ("api_request_timeout_s", float_in(0.0, 3600.0, lo_open=True), 10.0),
    # The teacher (`heidi generate`, design.md §7). Its key is read from the environment only.
    "TEACHER_PROVIDER": ("teacher_provider", one_of(*PROVIDERS), "mock"),
    "TEACHER_BASE_URL": ("teacher_base_url", _optional(_url), None),
    "TEACHER_ALLOW_HTTP": ("teacher_allow_http", _bool, False),
    "TEACHER_CONCURRENCY": ("teacher_concurrency", _int(1, 10_000), 16),
    "TEACHER_TIMEOUT_S": ("teacher_timeout_s", float_in(0.0, 86_400.0, lo_open=True), 120.0),
    "TEACHER_MAX_RETRIES": ("teacher_max_retries", _int(0, 100), 6),
    "TEACHER_MAX_REQUESTS": ("teacher_max_requests", _optional(_int(1, 10**12)), None),
    "TEACHER_MAX_TOKENS": ("teacher_max_tokens", _optional(_int(1, 10**15)), None),
    "TEACHER_RPM": ("teacher_rpm", _optional(float_in(0.0, 1e9, lo_open=True)), None),
    "TEACHER_TPM": ("teacher_tpm", _optional(float_in(0.0, 1e12, lo_open=True)), None),
    "TEACHER_TEMPERATURE": ("teacher_temperature", _optional(float_in(0.0, 2.0)), None),
    "TEACHER_MAX_OUTPUT_TOKENS": ("teacher_max_output_tokens", _optional(_int(1, 10_000_000)), None),
    "TEACHER_MOCK_DELAY_MS": ("teacher_mock_delay_ms", float_in(0.0, 600_000.0), 100.0),
}
