"""The teacher's collector (design.md §7, issue #10): concurrency overhead against the ideal, and
HTTP throughput against the `openai` SDK's AsyncOpenAI doing the same work.

- 10 x 100 ms MockProvider requests at concurrency 10: ideal 0.1 s (target within 1.5x);
- 1,000 x 100 ms mock requests at concurrency 100: ideal 1.0 s (target within 1.15x);
- 2,000 requests at concurrency 100 against a local OpenAI-compatible server (tests/fake_llm.py
  in its own process, 50 ms per reply): heidi's AsyncCollector + OpenAIProvider (aiohttp) beside
  AsyncOpenAI (httpx) under an asyncio.Semaphore(100); target: heidi at least as fast. The
  openai part needs `pip install heidi[bench]` and is skipped without it.

Run: python -m pytest bench/bench_teacher.py --benchmark-only -s -q
A table of medians and ratios is printed after the module; nothing is asserted about times.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from heidi.collector import AsyncCollector
from heidi.providers import MockProvider, OpenAIProvider

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTP_REQUESTS = 2000
HTTP_CONCURRENCY = 100
HTTP_LATENCY_MS = 50
_RESULTS: dict[str, tuple[float, float]] = {}  # name -> (median s, ideal or baseline s)


def _mock(n: int, concurrency: int) -> None:
    results = AsyncCollector(MockProvider(delay_ms=100), concurrency).generate(
        [f"prompt {i}" for i in range(n)])
    assert len(results) == n and all(r.ok for r in results)


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


@pytest.mark.parametrize("n, concurrency, ideal", [(10, 10, 0.1), (1000, 100, 1.0)],
                         ids=["10x100ms-c10", "1000x100ms-c100"])
def test_mock_collector(benchmark, n, concurrency, ideal):
    benchmark.group = "teacher: mock latency overlap"
    benchmark.pedantic(_mock, args=(n, concurrency), rounds=3, iterations=1, warmup_rounds=1)
    median = _median(benchmark)
    if median is not None:
        _RESULTS[f"mock {n} x 100 ms, concurrency {concurrency} (vs ideal)"] = (median, ideal)
        benchmark.extra_info["ratio_to_ideal"] = round(median / ideal, 3)


@pytest.fixture(scope="module")
def server_url():
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fake_llm.py"),
                             "--latency-ms", str(HTTP_LATENCY_MS)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prompts() -> list[str]:
    return [f"bench prompt {i}" for i in range(HTTP_REQUESTS)]


def _heidi(url: str) -> None:
    provider = OpenAIProvider(model="m", api_key="bench-key", base_url=url,
                              max_connections=HTTP_CONCURRENCY)
    results = AsyncCollector(provider, HTTP_CONCURRENCY, max_retries=0).generate(_prompts())
    assert all(r.ok for r in results), next(r.error for r in results if not r.ok)


def _openai(url: str) -> None:
    import openai

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=url, api_key="bench-key", max_retries=0)
        sem = asyncio.Semaphore(HTTP_CONCURRENCY)

        async def one(prompt: str) -> str:
            async with sem:
                reply = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": prompt}])
                return reply.choices[0].message.content or ""
        try:
            texts = await asyncio.gather(*(one(p) for p in _prompts()))
        finally:
            await client.close()
        assert len(texts) == HTTP_REQUESTS
    asyncio.run(main())


@pytest.mark.parametrize("client", ["heidi", "openai"])
def test_http_collector(benchmark, server_url, client):
    if client == "openai":
        pytest.importorskip("openai", reason="the openai SDK is a bench-only extra: pip install heidi[bench]")
    benchmark.group = (f"teacher: {HTTP_REQUESTS} HTTP requests, concurrency {HTTP_CONCURRENCY}, "
                       f"{HTTP_LATENCY_MS} ms")
    run = _heidi if client == "heidi" else _openai
    benchmark.pedantic(run, args=(server_url,), rounds=2, iterations=1, warmup_rounds=1)
    median = _median(benchmark)
    if median is not None:
        _RESULTS[f"http {client}"] = (median, HTTP_REQUESTS / HTTP_CONCURRENCY * HTTP_LATENCY_MS / 1000)


@pytest.fixture(scope="module", autouse=True)
def _report():
    """Print the table after the module's benchmarks (a fixture: --benchmark-only keeps it)."""
    yield
    if not _RESULTS:
        return
    lines = ["", "teacher collector: median s, ideal s, ratio"]
    for name, (median, ideal) in _RESULTS.items():
        lines.append(f"  {name:<52} {median:8.3f} {ideal:7.3f} {median / ideal:6.2f}x")
    if "http heidi" in _RESULTS and "http openai" in _RESULTS:
        heidi_s, openai_s = _RESULTS["http heidi"][0], _RESULTS["http openai"][0]
        lines.append(f"  heidi AsyncCollector vs openai.AsyncOpenAI: {heidi_s:.3f} s vs {openai_s:.3f} s "
                     f"-> heidi takes {heidi_s / openai_s:.2f}x the SDK's time")
    print("\n".join(lines))
