"""A real local LLM server for tests and benchmarks (aiohttp.web on 127.0.0.1, port 0) speaking
OpenAI chat completions (/v1/chat/completions) and Anthropic Messages (/v1/messages).

Each request is keyed by its last user message; `plan[key]` lists what successive attempts get:
"ok", ("status", code, headers), ("slow", seconds), "malformed", ("raw", code, body) (body: bytes,
or a function of the key the client sent). Requests are counted per key.
Run standalone (`python tests/fake_llm.py --latency-ms 50`) it prints its port and serves until
stdin closes or it is killed.
"""
from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
from typing import Any

from aiohttp import web


class FakeLLM:
    def __init__(self, latency_s: float = 0.0, key: str | None = None) -> None:
        self.latency_s = latency_s
        self.key = key
        self.plan: dict[str, list[Any]] = {}
        self.counts: collections.Counter = collections.Counter()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.auth_seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/messages", self._anthropic)
        return app

    async def _handle(self, request: web.Request, api: str) -> web.Response:
        body = await request.json()
        messages = body.get("messages") or []
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        self.counts[prompt] += 1
        self.times[prompt].append(time.monotonic())
        attempt = self.counts[prompt]
        given = (request.headers.get("Authorization", "").removeprefix("Bearer ")
                 if api == "openai" else request.headers.get("x-api-key", ""))
        self.auth_seen.append(given)
        if self.key is not None and given != self.key:
            # Real providers echo part of a wrong key; this one echoes all of it.
            return web.json_response({"error": {"message": f"Incorrect API key provided: {given}",
                                                "type": "invalid_request_error"}}, status=401)
        steps = self.plan.get(prompt) or []
        step = steps[attempt - 1] if attempt <= len(steps) else "ok"
        if isinstance(step, tuple) and step[0] == "slow":
            await asyncio.sleep(step[1])
            step = "ok"
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if isinstance(step, tuple) and step[0] == "status":
            _, code, headers = step
            return web.json_response({"error": {"message": f"planned {code} for {prompt[:40]}"}},
                                     status=code, headers=headers)
        if isinstance(step, tuple) and step[0] == "raw":
            _, code, raw = step  # raw: bytes, or a callable of the key the client sent
            data = raw(given) if callable(raw) else raw
            return web.Response(body=data, status=code, content_type="application/json")
        if step == "malformed":
            return web.Response(body=b'{"choices": [{"message": ', content_type="application/json")
        text = f"answer to {prompt}"
        if api == "openai":
            return web.json_response({
                "id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(prompt.split()) + 3, "completion_tokens": 4,
                          "total_tokens": len(prompt.split()) + 7}})
        return web.json_response({
            "id": "msg", "type": "message", "role": "assistant", "model": body.get("model"),
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": len(prompt.split()) + 5, "output_tokens": 6}})

    async def _openai(self, request: web.Request) -> web.Response:
        return await self._handle(request, "openai")

    async def _anthropic(self, request: web.Request) -> web.Response:
        return await self._handle(request, "anthropic")


class ServerThread:
    """FakeLLM served from a background thread with its own event loop; .url, .stop()."""

    def __init__(self, fake: FakeLLM) -> None:
        self.fake = fake
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake LLM server did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.fake.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def main() -> None:
    latency_ms = float(sys.argv[sys.argv.index("--latency-ms") + 1]) if "--latency-ms" in sys.argv else 0.0
    server = ServerThread(FakeLLM(latency_ms / 1000.0))
    print(server.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
    server.stop()


if __name__ == "__main__":
    main()
