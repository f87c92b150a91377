"""Redaction speed: compiled _redact_c vs pure _redact_py vs the rule list run with `re` one pattern
at a time (no keyword prefilter), on ~1 MB of clean training log and on log text with secrets.

Run: python -m pytest bench/bench_redact.py --benchmark-only   (design.md §10: clean text ≥ 5×)
"""
from __future__ import annotations

import importlib
import random
import re
import string
import uuid

import pytest

from heidi._fast import _redact_py, _redact_rules

try:
    _redact_c = importlib.import_module("heidi._fast._redact_c")
except ImportError:  # reported as "not built" in the ratio table; the other rows still run
    _redact_c = None

TARGET_CLEAN_SPEEDUP = 5.0
_TEXT_BYTES = 1 << 20


class PerPatternRe:
    """The baseline of design.md §10: every rule's regex over the whole text, in order."""

    def __init__(self) -> None:
        self._ansi = re.compile(_redact_rules.ANSI_PATTERN)
        self._rules = []
        for _name, placeholder, _keywords, pattern, flags in _redact_rules.RULES:
            regex = re.compile(pattern, flags)
            template = (r"\g<pre>" if "pre" in regex.groupindex else "") + placeholder + (
                r"\g<post>" if "post" in regex.groupindex else "")
            self._rules.append((regex, template))

    def redact(self, text: str) -> str:
        text = self._ansi.sub("", text)
        for regex, template in self._rules:
            text = regex.sub(template, text)
        return text


def _clean_log(rng: random.Random, size_bytes: int) -> str:
    """Ordinary stage output: losses, paths, hex ids, UUIDs, tokens/s prose, max_tokens=512."""
    hexd = "0123456789abcdef"
    models = ("meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.3", "Qwen/Qwen2.5-7B")
    lines, total, step = [], 0, 0
    while total < size_bytes:
        step += 1
        ts = f"2026-02-20T07:{step // 60 % 60:02d}:{step % 60:02d}.{rng.randrange(1000):03d}Z"
        kind = rng.random()
        if kind < 0.45:
            line = (f"{ts} INFO [train] step={step}/50000 loss={rng.uniform(0.5, 3):.4f} "
                    f"lr={rng.uniform(1e-6, 3e-5):.2e} grad_norm={rng.uniform(0.1, 4):.3f} "
                    f"tokens/s={rng.uniform(9000, 16000):.1f} mem={rng.uniform(20, 79):.1f}GiB")
        elif kind < 0.55:
            line = (f"{ts} INFO [gen] max_tokens=512 max_new_tokens=256 temperature=0.7 "
                    f"num_tokens: {rng.randrange(100, 9000)} \"total_tokens\": {rng.randrange(5000)}")
        elif kind < 0.65:
            line = (f"{ts} INFO saved checkpoint to /home/ml/runs/run_{step % 97:04d}/"
                    f"checkpoint-{step}/adapter_model.safetensors sha256="
                    + "".join(rng.choice(hexd) for _ in range(64)))
        elif kind < 0.72:
            line = (f"{ts} DEBUG commit " + "".join(rng.choice(hexd) for _ in range(40))
                    + f" dataset_uuid={uuid.UUID(int=rng.getrandbits(128))} rows={rng.randrange(10**6)}")
        elif kind < 0.78:
            line = (f"{ts} INFO Downloading https://huggingface.co/{rng.choice(models)}/resolve/main/"
                    f"model-{step % 4 + 1:05d}-of-00004.safetensors")
        elif kind < 0.85:
            line = (f"{ts} INFO the tokenizer produced {rng.randrange(10**5)} tokens in "
                    f"{rng.uniform(0.1, 2):.2f}s; token_count=12 padding side: left")
        elif kind < 0.92:
            line = (f"{ts} INFO eval {{\"eval_loss\": {rng.uniform(0.5, 2):.4f}, \"perplexity\": "
                    f"{rng.uniform(1, 9):.2f}, \"num_tokens\": {rng.randrange(10**6)}}}")
        else:
            line = (f"Epoch {step % 10}/10: {rng.randrange(100)}%|█████     | "
                    f"{rng.randrange(500)}/500 [01:23<00:41, {rng.uniform(1, 9):.2f}it/s]")
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def _fake(rng: random.Random, n: int) -> str:
    return rng.choice(string.ascii_letters) + "".join(
        rng.choice(string.ascii_letters + string.digits) for _ in range(n - 1))


def _secret_log(rng: random.Random, clean: str) -> str:
    """The clean log with every 20th line carrying a secret (assembled here, never a literal)."""
    makers = (
        lambda: f"pushing adapter with token ghp_{_fake(rng, 36)} to the hub",
        lambda: f"teacher: OPENAI_API_KEY=sk-{_fake(rng, 48)} model=gpt-4o",
        lambda: f"x-api-key: sk-ant-api03-{_fake(rng, 93)}AA",
        lambda: f"HF_TOKEN=hf_{_fake(rng, 34)}",
        lambda: f"aws_access_key_id=AKIA{_fake(rng, 16).upper()} region=us-east-1",
        lambda: f"curl -H 'Authorization: Bearer {_fake(rng, 40)}' https://api.example.com",
        lambda: f"DATABASE_URL=postgres://trainer:{_fake(rng, 16)}@db:5432/runs",
        lambda: f"{{\"client_secret\": \"{_fake(rng, 32)}\", \"client_id\": \"heidi\"}}",
        lambda: f"db_password={_fake(rng, 14)} host=db",
    )
    lines = clean.split("\n")
    for i in range(0, len(lines) - 1, 20):
        lines[i] = lines[i] + " " + rng.choice(makers)()
    return "\n".join(lines)


_rng = random.Random(20260220)
CLEAN_TEXT = _clean_log(_rng, _TEXT_BYTES)
SECRET_TEXT = _secret_log(_rng, CLEAN_TEXT)
MESSAGE_TEXT = ("stage train finished: loss=0.8123 eval_loss=1.2211 tokens/s=15234.2 max_tokens=512 "
                "checkpoint=/home/ml/runs/run_0001/checkpoint-1200 commit 3f7a2c9e8b1d4f6a0c5e7b9d")
TEXTS = {"clean-1MB": CLEAN_TEXT, "secrets-1MB": SECRET_TEXT, "message-160B": MESSAGE_TEXT}

IMPLS = {"compiled": _redact_c, "pure": _redact_py, "per-pattern-re": None}
_MEDIANS: dict[tuple[str, str], float] = {}


def _redactor(impl: str):
    if impl == "per-pattern-re":
        return PerPatternRe()
    module = IMPLS[impl]
    if module is None:
        pytest.skip("heidi._fast._redact_c is not built")
    return module.Redactor(env={})


@pytest.fixture(scope="module", autouse=True)
def ratio_report(request):
    """After the module, print each text's medians and the speed-ups over per-pattern re."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _MEDIANS:
        return
    # Teardown output is captured like a test's; the table must reach the terminal.
    with capture.global_and_fixture_disabled():
        _write_ratios(reporter)


def _write_ratios(reporter) -> None:
    reporter.write_line("")
    reporter.write_line("redaction medians (ms) and speed-up over per-pattern re:")
    for text_kind in TEXTS:
        base = _MEDIANS.get((text_kind, "per-pattern-re"))
        cells = []
        for impl in IMPLS:
            median = _MEDIANS.get((text_kind, impl))
            if median is None:
                cells.append(f"{impl} n/a")
            elif base:
                cells.append(f"{impl} {median * 1e3:.3f} ms ({base / median:.1f}x)")
            else:
                cells.append(f"{impl} {median * 1e3:.3f} ms")
        reporter.write_line(f"  {text_kind:13s} " + " | ".join(cells))
    compiled, base = _MEDIANS.get(("clean-1MB", "compiled")), _MEDIANS.get(("clean-1MB", "per-pattern-re"))
    if compiled and base:
        verdict = "met" if base / compiled >= TARGET_CLEAN_SPEEDUP else "NOT MET"
        reporter.write_line(f"  clean text, compiled vs per-pattern re: {base / compiled:.1f}x "
                            f"(target >= {TARGET_CLEAN_SPEEDUP:.0f}x: {verdict})")


def test_all_implementations_agree():
    """Not timed: the speed-ups are only meaningful if every implementation redacts the same."""
    for text in TEXTS.values():
        expected = PerPatternRe().redact(text)
        assert _redact_py.Redactor(env={}).redact(text) == expected
        if _redact_c is not None:
            assert _redact_c.Redactor(env={}).redact(text) == expected
    assert "[GITHUB_TOKEN]" in PerPatternRe().redact(SECRET_TEXT)


def _run(benchmark, text_kind: str, impl: str) -> None:
    redactor = _redactor(impl)
    text = TEXTS[text_kind]
    benchmark.extra_info["text_chars"] = len(text)
    benchmark(redactor.redact, text)
    if benchmark.stats is not None:
        _MEDIANS[(text_kind, impl)] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="redact clean-1MB")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_redact_clean_log(benchmark, impl):
    _run(benchmark, "clean-1MB", impl)


@pytest.mark.benchmark(group="redact secrets-1MB")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_redact_secret_log(benchmark, impl):
    _run(benchmark, "secrets-1MB", impl)


@pytest.mark.benchmark(group="redact message-160B")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_redact_event_message(benchmark, impl):
    _run(benchmark, "message-160B", impl)


# ---- environment secrets on the stage-log path (line by line) ----------------------------------

# Six secret env variables, as a GPU box running the teacher has (teacher key, HF, W&B, AWS ...):
# each value is also looked for in ~12 encodings. Stage logs redact line by line, so the rows are
# 2,000 lines of the clean log, one redact() call each, with no env secrets and with these six.
_env_rng = random.Random(6)
ENV_SECRETS = {f"SECRET_{i}_TOKEN": _fake(_env_rng, 40) for i in range(6)}
LINES = CLEAN_TEXT.splitlines(keepends=True)[:2000]


def _per_line(redact) -> None:
    for line in LINES:
        redact(line)


@pytest.mark.benchmark(group="redact 2000 lines, env secrets")
@pytest.mark.parametrize("impl", ["compiled", "pure"])
@pytest.mark.parametrize("env", ["no-env", "6-env-secrets"])
def test_redact_lines_with_env_secrets(benchmark, impl, env):
    module = IMPLS[impl]
    if module is None:
        pytest.skip("heidi._fast._redact_c is not built")
    redactor = module.Redactor(env=ENV_SECRETS if env != "no-env" else {})
    benchmark(_per_line, redactor.redact)
