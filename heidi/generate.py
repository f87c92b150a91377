"""`heidi generate`: the teacher stage heidi ships. Plans N samples (prompts from a file, cycled,
or built-in code tasks), asks the configured provider through AsyncCollector, and appends one
SFT/Alpaca JSON line per sample as replies arrive; a rerun skips ids already in the file.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from .collector import AsyncCollector, Result
from .config import SETTINGS, Config
from .counters import write_counters
from .errors import ConfigError, HeidiError, UsageError
from .providers import (DEFAULT_MODELS, AnthropicProvider, MockProvider, OpenAIProvider,
                        Provider, is_loopback)
from .tasks import SYSTEM_PROMPT, MockTeacher, make_task, user_content
from .waiting import with_path

PROGRESS_EVERY_S = 5.0
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass
class Planned:
    """One sample to produce: its id and what the teacher is asked."""

    id: str
    instruction: str
    input: str


def sample_id(round_: int, seed: int, index: int) -> str:
    return f"r{round_}-s{seed}-{index:06d}"


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(instruction, input) pairs from a JSONL file ({"instruction", "input"?} per line) or a
    plain-text file (one instruction per line); blank lines are skipped."""
    import orjson
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise UsageError(f"heidi generate: --prompts {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"heidi generate: --prompts {path}: not UTF-8 text") from None
    prompts = []
    for no, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise UsageError(f"heidi generate: --prompts {path} line {no}: invalid JSON") from None
            if not isinstance(obj.get("instruction"), str) or not obj["instruction"].strip() \
                    or not isinstance(obj.get("input", ""), str):
                raise UsageError(f"heidi generate: --prompts {path} line {no}: needs a non-empty "
                                 "string \"instruction\" (and \"input\", if any, a string)")
            prompts.append((obj["instruction"], obj.get("input", "")))
        else:
            prompts.append((text, ""))
    if not prompts:
        raise UsageError(f"heidi generate: --prompts {path}: no prompts in it")
    return prompts


def plan(samples: int, round_: int, seed: int, prompts: list[tuple[str, str]] | None,
         teacher: MockTeacher | None = None) -> list[Planned]:
    result = []
    for i in range(samples):
        if prompts is not None:
            instruction, task_input = prompts[i % len(prompts)]
        else:
            task = make_task(seed, round_, i)
            instruction, task_input = task.instruction, task.input
            if teacher is not None:
                teacher.add(task, i, round_)
        result.append(Planned(sample_id(round_, seed, i), instruction, task_input))
    return result


def api_key(provider: str, environ: Any = None) -> str | None:
    """TEACHER_API_KEY, else the provider's usual variable; checked, never echoed."""
    env = os.environ if environ is None else environ
    for name in ("TEACHER_API_KEY", KEY_ENV.get(provider, "")):
        value = env.get(name) if name else None
        if value:
            if any(c.isspace() or ord(c) < 32 for c in value):
                raise ConfigError(f"{name}: must be a single token without spaces or control "
                                  "characters (value not shown)")
            return value
    return None


def make_provider(cfg: Config, teacher: MockTeacher | None = None,
                  environ: Any = None) -> Provider:
    """The provider TEACHER_PROVIDER names, its key from the environment (none needed for mock or
    a local server)."""
    kind = cfg.teacher_provider
    # TEACHER_MODEL's default is an OpenAI model (and reaches stages as if set): another
    # provider left at that default gets its own default model.
    model = cfg.teacher_model
    if kind != "openai" and model == SETTINGS["TEACHER_MODEL"][2]:
        model = DEFAULT_MODELS[kind]
    if kind == "mock":
        return MockProvider(cfg.teacher_mock_delay_ms, cfg.seed, model=model, reply=teacher)
    key = api_key(kind, environ)
    cls = OpenAIProvider if kind == "openai" else AnthropicProvider
    base_url = cfg.teacher_base_url or ("https://api.openai.com/v1" if kind == "openai"
                                        else "https://api.anthropic.com")
    from urllib.parse import urlsplit
    if key is None and not is_loopback(urlsplit(base_url).hostname or ""):
        raise ConfigError(f"TEACHER_API_KEY (or {KEY_ENV[kind]}) is not set: the {kind} provider "
                          f"at {base_url} needs a key")
    return cls(model=model, api_key=key, base_url=base_url, allow_http=cfg.teacher_allow_http,
               max_connections=cfg.teacher_concurrency)


def existing_ids(path: str) -> set[str]:
    """Ids of the samples already in `path`. A torn last line (the writer was killed mid-write)
    is cut off, so appending goes on from a whole line."""
    import orjson
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return set()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        os.truncate(path, cut)
        data = data[:cut]
    ids = set()
    for line in data.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # not ours to judge: validation drops it
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            ids.add(obj["id"])
    return ids


class Progress:
    """done/total, req/s, tokens and ETA: one live line on a terminal, else a line every ~5 s."""

    def __init__(self, total: int, already: int, stats: Any, out: IO[str]) -> None:
        self.total, self.done, self.stats, self.out = total, already, stats, out
        self.tty = out.isatty()
        self.started = self.last = time.monotonic()
        self.new = 0

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else PROGRESS_EVERY_S):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.new / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        tokens = self.stats.prompt_tokens + self.stats.completion_tokens
        line = (f"generate: {self.done}/{self.total} samples, {self.stats.requests / elapsed:.1f} req/s, "
                f"{tokens} tokens, {self.stats.retries} retries, ETA {eta}")
        self.out.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


def run_generate(cfg: Config, samples: int, output: str, prompts_path: str | None = None,
                 round_: int = 1, seed: int | None = None, out: IO[str] | None = None,
                 provider: Provider | None = None) -> dict[str, int]:
    """Bring `output` to `samples` distinct ids; returns the counters. Raises HeidiError (exit 1)
    when a budget or an error ends it early; what was written stays."""
    out = out or sys.stdout
    seed = cfg.seed if seed is None else seed
    prompts = read_prompts(prompts_path) if prompts_path else None
    teacher = MockTeacher(seed) if prompts is None and cfg.teacher_provider == "mock" else None
    planned = plan(samples, round_, seed, prompts, teacher)
    if provider is None:
        provider = make_provider(cfg, teacher)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    have = existing_ids(output)
    todo = [p for p in planned if p.id not in have]
    collector = AsyncCollector(
        provider, cfg.teacher_concurrency, timeout_s=cfg.teacher_timeout_s,
        max_retries=cfg.teacher_max_retries, max_requests=cfg.teacher_max_requests,
        max_tokens=cfg.teacher_max_tokens, rpm=cfg.teacher_rpm, tpm=cfg.teacher_tpm,
        temperature=cfg.teacher_temperature, max_output_tokens=cfg.teacher_max_output_tokens)
    progress = Progress(samples, samples - len(todo), collector.stats, out)
    print(f"generate: round {round_}, seed {seed}, teacher {cfg.teacher_provider} "
          f"({provider.model}): {len(todo)} of {samples} samples to make, {len(have)} lines already "
          f"in {output}", file=out, flush=True)
    import orjson
    written = 0
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    failed: list[Result] = []

    def on_result(result: Result) -> None:
        nonlocal written
        if not result.ok:
            if not (result.error or "").startswith("not sent"):
                failed.append(result)
            return
        item = todo[result.index]
        line = orjson.dumps({
            "id": item.id, "instruction": item.instruction, "input": item.input,
            "output": result.text,
            "metadata": {"provider": cfg.teacher_provider, "model": provider.model,
                         "round": round_, "prompt_tokens": result.prompt_tokens,
                         "completion_tokens": result.completion_tokens,
                         "latency_ms": result.latency_ms}}) + b"\n"
        # One write per line on an O_APPEND fd: a kill leaves whole lines (or one torn tail).
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise with_path(exc, output) from None
        written += 1
        progress.done += 1
        progress.new += 1
        progress.tick()

    messages = [[{"role": "system", "content": SYSTEM_PROMPT},
                 {"role": "user", "content": user_content(p.instruction, p.input)}] for p in todo]

    async def main() -> None:
        try:
            await collector.agenerate(messages, on_result)
        finally:
            await provider.aclose()
    try:
        if todo:
            asyncio.run(main())
        try:
            os.fsync(fd)
        except OSError as exc:
            raise with_path(exc, output) from None
    finally:
        os.close(fd)
        if progress.tty:
            progress.tick(force=True)
        progress.close()
        counters = {"samples": written, **collector.stats.as_counters()}
        write_counters(counters)
    stats = collector.stats
    summary = (f"generate: wrote {written} samples ({samples - len(todo) + written}/{samples} in "
               f"{output}); {stats.requests} requests, {stats.retries} retries, "
               f"{stats.failures} failed, {stats.prompt_tokens}+{stats.completion_tokens} tokens")
    print(summary, file=out, flush=True)
    missing = len(todo) - written
    if missing:
        if stats.stopped is not None:
            reason = stats.stopped
            if reason.startswith("request budget"):
                reason += " (TEACHER_MAX_REQUESTS)"
            elif reason.startswith("token budget"):
                reason += " (TEACHER_MAX_TOKENS)"
        else:
            reason = f"{len(failed)} requests failed after retries; last: {failed[-1].error}" \
                if failed else "requests failed"
        raise HeidiError(f"generate stopped with {missing} of {samples} samples missing: "
                         f"{reason}; rerun the same command to continue")
    return counters
