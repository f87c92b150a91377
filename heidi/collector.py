"""AsyncCollector: many teacher requests at once under a concurrency bound, client-side RPM/TPM
limits, per-request timeouts, retries with full-jitter backoff that honour Retry-After, and
request/token budgets; results come back in input order with per-request usage.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .providers import Messages, Provider, ProviderError, scrub, to_messages, estimate_tokens

OnResult = Callable[["Result"], Any]


@dataclass
class Result:
    """The outcome of one prompt. `text` is None when it failed or was never sent (`error` says
    why: the provider's redacted message, a timeout, or the budget that stopped it)."""

    index: int
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    attempts: int = 0
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass
class Stats:
    """Totals over the collector's life: requests sent (retries included), retries, prompts that
    finally failed, prompts never sent, tokens billed, and why new requests stopped (if they did)."""

    requests: int = 0
    retries: int = 0
    completed: int = 0
    failures: int = 0
    not_sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stopped: str | None = None
    fatal: bool = False

    def as_counters(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "failures": self.failures,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class TokenBucket:
    """A token bucket that lends: a reservation always succeeds and returns how long to wait
    (the bucket's debt over its rate), so waiters are served first come, first served, with no
    lock and no event loop of its own."""

    rate_per_s: float
    capacity: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(default=0.0, init=False)
    _at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self._at = self.clock()

    def reserve(self, cost: float) -> float:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        self.tokens -= min(cost, self.capacity)  # one request larger than the bucket still goes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate_per_s

    def adjust(self, delta: float) -> None:
        """Charge (or give back) the difference between an estimate and what was really used."""
        self.tokens = min(self.capacity, self.tokens - delta)

    async def acquire(self, cost: float) -> None:
        delay = self.reserve(cost)
        if delay > 0:
            await asyncio.sleep(delay)


class AsyncCollector:
    """Send prompts to a provider concurrently.

    concurrency: requests in flight at once. timeout_s: per attempt. max_retries: further tries
    after a retryable failure (429, 5xx, timeout, connection error), each after a full-jitter
    exponential backoff (base * 2**n, capped) or the server's Retry-After if longer. Other 4xx are
    not retried and, with fail_fast, stop new requests. max_requests: requests sent (retries
    included), never exceeded. max_tokens: once billed tokens reach it no new request starts
    (those in flight finish). rpm / tpm: client-side rate limits.
    """

    def __init__(self, provider: Provider, concurrency: int = 16, *, timeout_s: float = 120.0,
                 max_retries: int = 6, max_requests: int | None = None,
                 max_tokens: int | None = None, rpm: float | None = None,
                 tpm: float | None = None, temperature: float | None = None,
                 max_output_tokens: int | None = None, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 60.0, max_retry_after_s: float = 600.0,
                 fail_fast: bool = True, seed: int | None = None) -> None:
        if concurrency < 1 or timeout_s <= 0 or max_retries < 0:
            raise ValueError("concurrency >= 1, timeout_s > 0 and max_retries >= 0 are required")
        self.provider = provider
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.fail_fast = fail_fast
        self.stats = Stats()
        self._rng = random.Random(seed)
        # RPM paced over about a second; TPM allows a burst of ten seconds' worth.
        self._rpm = TokenBucket(rpm / 60.0, max(1.0, rpm / 60.0)) if rpm else None
        self._tpm = TokenBucket(tpm / 60.0, max(1.0, tpm / 6.0)) if tpm else None
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public API ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence["str | Messages"],
                 on_result: OnResult | None = None) -> list[Result]:
        """The sync wrapper: runs agenerate in a fresh event loop and closes the provider's
        connections afterwards. Inside a running loop, await agenerate() instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("AsyncCollector.generate() called inside an event loop; "
                               "use `await collector.agenerate(prompts)`")

        async def main() -> list[Result]:
            try:
                return await self.agenerate(prompts, on_result)
            finally:
                await self.provider.aclose()
        return asyncio.run(main())

    async def agenerate(self, prompts: Sequence["str | Messages"],
                        on_result: OnResult | None = None) -> list[Result]:
        """One Result per prompt, in input order. on_result(result) is called as each prompt
        finishes (in completion order), including prompts never sent because requests stopped."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._sem = asyncio.Semaphore(self.concurrency)
            self._loop = loop
        messages = [to_messages(p) for p in prompts]
        results: list[Result | None] = [None] * len(messages)
        indexes = iter(range(len(messages)))

        async def worker() -> None:
            for i in indexes:  # shared iterator: each prompt is taken by exactly one worker
                if self.stats.stopped is not None:
                    result = Result(i, error=f"not sent: {self.stats.stopped}")
                    self.stats.not_sent += 1
                else:
                    result = await self._one(i, messages[i])
                results[i] = result
                if on_result is not None:
                    on_result(result)

        workers = [asyncio.ensure_future(worker())
                   for _ in range(min(self.concurrency, len(messages)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        return [r for r in results if r is not None]

    # -- one prompt ---------------------------------------------------------------------------

    def _budget_reached(self) -> str | None:
        if self.max_requests is not None and self.stats.requests >= self.max_requests:
            return f"request budget of {self.max_requests} reached"
        if self.max_tokens is not None and \
                self.stats.prompt_tokens + self.stats.completion_tokens >= self.max_tokens:
            return f"token budget of {self.max_tokens} reached"
        return None

    def backoff_s(self, retry: int, retry_after: float | None) -> float:
        """Full jitter: uniform(0, min(cap, base * 2**retry)), or Retry-After when longer."""
        delay = self._rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2 ** retry)))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    async def _one(self, index: int, messages: list[dict[str, str]]) -> Result:
        stats = self.stats
        attempts = 0
        started = time.monotonic()
        estimate = sum(estimate_tokens(m.get("content", "")) for m in messages) + \
            (self.max_output_tokens or 256)
        while True:
            reason = self._budget_reached()
            if reason is not None:
                stats.stopped = stats.stopped or reason
                stats.failures += 1 if attempts else 0
                stats.not_sent += 0 if attempts else 1
                return Result(index, attempts=attempts, latency_ms=_ms(started),
                              error=reason if attempts else f"not sent: {reason}")
            stats.requests += 1  # reserved before any await: the budget is exact
            stats.retries += 1 if attempts else 0  # a retry counts once it is really sent
            attempts += 1
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(estimate)
            assert self._sem is not None
            error: ProviderError
            async with self._sem:
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(self.timeout_s):
                        done = await self.provider.complete(
                            messages, temperature=self.temperature,
                            max_output_tokens=self.max_output_tokens)
                except ProviderError as exc:
                    error = exc
                except TimeoutError:
                    error = ProviderError(f"{self.provider.name}: no reply within {self.timeout_s:g} s",
                                          retryable=True)
                except (OSError, EOFError) as exc:
                    error = ProviderError(scrub(f"{self.provider.name}: {type(exc).__name__}: {exc}", ()),
                                          retryable=True)
                except Exception as exc:  # a provider's own bug must not take the others down
                    error = ProviderError(scrub(f"{self.provider.name}: {type(exc).__name__}: {exc}", ()))
                else:
                    latency = _ms(t0)
                    stats.prompt_tokens += done.prompt_tokens
                    stats.completion_tokens += done.completion_tokens
                    stats.completed += 1
                    if self._tpm is not None:
                        self._tpm.adjust(done.prompt_tokens + done.completion_tokens - estimate)
                    return Result(index, done.text, done.prompt_tokens, done.completion_tokens,
                                  latency, attempts)
            if not error.retryable or attempts > self.max_retries:
                stats.failures += 1
                if not error.retryable and self.fail_fast:
                    stats.fatal = True
                    stats.stopped = stats.stopped or f"non-retryable error: {error}"
                elif error.retryable:
                    error = ProviderError(f"{error} (gave up after {attempts} attempts)",
                                          status=error.status)
                return Result(index, attempts=attempts, latency_ms=_ms(started), error=str(error),
                              status=error.status)
            await asyncio.sleep(self.backoff_s(attempts - 1, error.retry_after))


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000.0, 3)
