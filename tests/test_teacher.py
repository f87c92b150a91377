"""Providers and AsyncCollector against MockProvider and a real local HTTP server speaking the
OpenAI and Anthropic APIs: concurrency, retries and Retry-After, fail-fast 4xx, budgets, rate
limits, input order, and keys kept out of every error."""
from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from heidi import AsyncCollector, MockProvider
from heidi.providers import (AnthropicProvider, OpenAIProvider, check_base_url,
                             parse_retry_after)

KEY = "sk-test-" + "k3y" * 10


def openai(url: str, key: str | None = KEY) -> OpenAIProvider:
    return OpenAIProvider(model="m", api_key=key, base_url=url + "/v1")


def collector(provider, **kw) -> AsyncCollector:
    kw.setdefault("backoff_base_s", 0.001)
    return AsyncCollector(provider, **kw)


# ---- the walkthrough's check ------------------------------------------------------------------

def test_ten_100ms_mock_requests_overlap():
    """The issue: 10 x 100 ms MockProvider requests finish in < 0.2 s (serially: 1 s). The bound
    here is generous for a loaded 2-core box; bench/bench_teacher.py measures the ratio."""
    c = AsyncCollector(MockProvider(delay_ms=100), concurrency=10)
    started = time.perf_counter()
    results = c.generate([f"prompt {i}" for i in range(10)])
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, elapsed
    assert [r.ok for r in results] == [True] * 10


def test_results_in_input_order_with_usage_sync_and_async(server):
    fake, srv = server()
    # Later prompts answer faster: completion order is the reverse of input order.
    for i in range(6):
        fake.plan[f"p{i}"] = [("slow", 0.05 * (6 - i))]
    prompts = [f"p{i}" for i in range(6)]
    seen = []
    results = collector(openai(srv.url), concurrency=6).generate(prompts, seen.append)
    assert [r.text for r in results] == [f"answer to p{i}" for i in range(6)]
    assert [r.index for r in seen] == [5, 4, 3, 2, 1, 0]
    assert all(r.prompt_tokens == 4 and r.completion_tokens == 4 and r.latency_ms > 0 for r in results)

    async def run():
        provider = AnthropicProvider(model="claude-x", api_key=KEY, base_url=srv.url)
        try:
            return await collector(provider, concurrency=3).agenerate(
                [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b c"}]])
        finally:
            await provider.aclose()
    [result] = asyncio.run(run())
    assert result.text == "answer to a b c" and (result.prompt_tokens, result.completion_tokens) == (8, 6)


def test_generate_refuses_to_run_inside_an_event_loop():
    c = AsyncCollector(MockProvider(delay_ms=0))

    async def inside():
        c.generate(["x"])
    with pytest.raises(RuntimeError, match="agenerate"):
        asyncio.run(inside())


# ---- retries ---------------------------------------------------------------------------------

def test_429_retry_after_seconds_and_ms_are_honoured(server):
    fake, srv = server()
    fake.plan["s"] = [("status", 429, {"Retry-After": "1"}), "ok"]
    fake.plan["ms"] = [("status", 429, {"retry-after-ms": "400"}), "ok"]
    c = collector(openai(srv.url), concurrency=2)
    results = c.generate(["s", "ms"])
    assert [r.text for r in results] == ["answer to s", "answer to ms"]
    assert [r.attempts for r in results] == [2, 2]
    assert fake.times["s"][1] - fake.times["s"][0] >= 0.99
    assert fake.times["ms"][1] - fake.times["ms"][0] >= 0.39
    assert c.stats.retries == 2 and c.stats.requests == 4 and c.stats.failures == 0


def test_retry_after_http_date():
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after({"Retry-After": date}, now=now) <= 31
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_5xx_malformed_json_and_slow_replies_are_retried(server):
    fake, srv = server()
    fake.plan["five"] = [("status", 500, {}), ("status", 503, {}), "ok"]
    fake.plan["bad"] = ["malformed", "ok"]
    fake.plan["slow"] = [("slow", 2.0), "ok"]
    c = collector(openai(srv.url), concurrency=3, timeout_s=0.5)
    results = c.generate(["five", "bad", "slow"])
    assert [r.ok for r in results] == [True, True, True]
    assert [fake.counts[p] for p in ("five", "bad", "slow")] == [3, 2, 2]
    assert c.stats.retries == 4


def test_gives_up_after_max_retries_with_one_line_error(server):
    fake, srv = server()
    fake.plan["x"] = [("status", 502, {})] * 10
    c = collector(openai(srv.url), max_retries=2)
    [result] = c.generate(["x"])
    assert not result.ok and fake.counts["x"] == 3 and result.attempts == 3
    assert "HTTP 502" in result.error and "gave up after 3 attempts" in result.error
    assert "\n" not in result.error


@pytest.mark.parametrize("status", [400, 401])
def test_no_retry_on_other_4xx_and_no_new_requests_after_it(server, status):
    fake, srv = server()
    fake.plan["p0"] = [("status", status, {})] * 3
    c = collector(openai(srv.url), concurrency=1)
    results = c.generate([f"p{i}" for i in range(5)])
    assert fake.counts["p0"] == 1 and sum(fake.counts.values()) == 1
    assert f"HTTP {status}" in results[0].error and "planned" in results[0].error
    assert all(r.error.startswith("not sent") for r in results[1:])
    assert c.stats.fatal and c.stats.failures == 1 and c.stats.not_sent == 4


def test_wrong_key_echoed_by_the_server_is_kept_out_of_the_error(server):
    fake, srv = server(key="the-right-key-1234567890")
    [result] = collector(openai(srv.url)).generate(["hello"])
    assert fake.auth_seen == [KEY]  # the server did get (and echo) it
    assert "HTTP 401" in result.error and "Incorrect API key" in result.error
    assert KEY not in result.error and KEY[:20] not in result.error
    assert KEY not in repr(openai(srv.url))


@pytest.mark.parametrize("status, at", [(500, 170), (401, 175), (500, 190), (200, 110), (200, 5000)])
def test_a_key_echoed_where_the_error_is_cut_leaves_no_part_of_it(server, status, at):
    """The body is scrubbed whole before it is cut to an error's length: a key that straddles
    the cut (at 200 characters of an error body, 120 of a malformed answer) leaves no prefix."""
    key = "qwerty0123456789plainvendortoken"  # no shape the redaction rules know
    fake, srv = server()
    fake.plan["p"] = [("raw", status, lambda sent: b"x" * at + sent.encode() + b" tail")] * 3
    [result] = collector(openai(srv.url, key=key), max_retries=0).generate(["p"])
    assert fake.auth_seen == [key] and result.error
    for n in range(6, len(key) + 1):
        assert key[:n] not in result.error, (n, result.error)
    assert "\n" not in result.error


# ---- budgets and rate limits -----------------------------------------------------------------

def test_request_budget_stops_at_the_exact_count_retries_included(server):
    fake, srv = server(latency_s=0.01)
    fake.plan["p3"] = [("status", 500, {}), "ok"]
    c = collector(openai(srv.url), concurrency=5, max_requests=7)
    results = c.generate([f"p{i}" for i in range(20)])
    assert sum(fake.counts.values()) == 7 and c.stats.requests == 7
    # Every request sent is a success, a retry, or the last try of a prompt that failed.
    assert sum(r.ok for r in results) + c.stats.retries + c.stats.failures == 7
    assert all("request budget of 7 reached" in r.error for r in results if not r.ok)
    assert c.stats.stopped == "request budget of 7 reached"


def test_token_budget_stops_new_requests():
    provider = MockProvider(delay_ms=1)
    c = AsyncCollector(provider, concurrency=1, max_tokens=30)
    results = c.generate(["x" * 40] * 10)  # 10 prompt + 10 reply tokens each (the echo)
    used = c.stats.prompt_tokens + c.stats.completion_tokens
    assert provider.calls == 2 and used >= 30
    assert sum(r.ok for r in results) == 2 and c.stats.not_sent == 8


def test_rpm_limit_paces_requests():
    c = AsyncCollector(MockProvider(delay_ms=0), concurrency=50, rpm=600)  # 10/s, burst 10
    started = time.perf_counter()
    c.generate([f"p{i}" for i in range(20)])
    assert time.perf_counter() - started >= 0.9


def test_mock_injected_failures_are_deterministic_and_retried():
    def run():
        c = AsyncCollector(MockProvider(delay_ms=1, seed=3, failure_rate=0.4, retry_after_s=0.01),
                           concurrency=8, timeout_s=0.2, backoff_base_s=0.001, seed=1)
        return c, c.generate([f"p{i}" for i in range(30)])
    c1, r1 = run()
    c2, r2 = run()
    assert all(r.ok for r in r1) and c1.stats.retries > 0
    assert c1.stats.retries == c2.stats.retries and [r.text for r in r1] == [r.text for r in r2]


# ---- base URLs -------------------------------------------------------------------------------

def test_plain_http_only_for_loopback():
    assert check_base_url("https://api.openai.com/v1") is None
    assert check_base_url("http://127.0.0.1:8000/v1") is None
    assert check_base_url("http://localhost:11434/v1") is None
    assert check_base_url("http://[::1]:8000/v1") is None
    assert "loopback" in check_base_url("http://10.0.0.5:8000/v1")
    assert check_base_url("http://10.0.0.5:8000/v1", allow_http=True) is None
    assert check_base_url("ftp://x/v1") is not None
    assert "credentials" in check_base_url(f"https://user:{KEY}@api.example.com/v1")
    with pytest.raises(ValueError) as exc:
        OpenAIProvider(api_key=KEY, base_url=f"https://user:{KEY}@api.example.com/v1")
    assert KEY not in str(exc.value)
