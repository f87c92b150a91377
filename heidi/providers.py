"""Teacher providers: one async interface (messages + parameters -> text + token usage) over a
deterministic MockProvider, OpenAI-compatible chat completions and Anthropic Messages.

aiohttp is imported only when an HTTP provider sends its first request.
"""
from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import asyncio

Messages = Sequence[Mapping[str, str]]
# Statuses worth another try: throttling, server trouble, Anthropic's 529 "overloaded".
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MODELS = {"mock": "mock", "openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
MAX_ERROR_CHARS = 200


@dataclass
class Completion:
    """One reply: its text and the tokens the provider billed for it."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ProviderError(Exception):
    """A request that failed: `retryable` says whether another try may succeed; `retry_after`
    (seconds) is the server's own wait hint, if it gave one. The message is already redacted."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class Provider(Protocol):
    """What AsyncCollector drives. `complete` raises ProviderError (or asyncio.TimeoutError /
    OSError, which count as retryable) on failure."""

    name: str
    model: str

    async def complete(self, messages: Messages, *, temperature: float | None = None,
                       max_output_tokens: int | None = None) -> Completion: ...

    async def aclose(self) -> None: ...


def estimate_tokens(text: str) -> int:
    """A provider-independent token estimate (about 4 characters per token)."""
    return max(1, (len(text) + 3) // 4)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000.0
            if value >= 0 and math.isfinite(value):
                return value
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return value if value >= 0 and math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None  # (3.10+ raises where older Pythons returned None)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_base_url(url: str, allow_http: bool = False) -> str | None:
    """Why `url` is not acceptable as a provider base URL, or None. TLS is required except for
    loopback hosts (a local vLLM/Ollama) or with allow_http (TEACHER_ALLOW_HTTP=1)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return "not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "must not carry credentials (use TEACHER_API_KEY)"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        return "plain http:// is allowed only for loopback hosts (set TEACHER_ALLOW_HTTP=1 to override)"
    return None


# How much of a provider's body an error is made from: scrubbed as a whole, then cut to
# MAX_ERROR_CHARS, so that no key is cut in two before it is looked for.
SCRUB_WINDOW = 64 * 1024


def scrub(text: str, secrets: Sequence[str]) -> str:
    """One line, the key values cut out, then the usual redaction, cut to MAX_ERROR_CHARS
    (last: a text cut before the key is looked for could keep the key's first characters)."""
    from ._fast.redact import redact
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[API_KEY]")
    text = " ".join(text.split())
    text = redact(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 1] + "…"


def to_messages(prompt: "str | Messages") -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


# -- mock --------------------------------------------------------------------------------------

class MockProvider:
    """Deterministic replies after `delay_ms`, for tests and offline demos.

    `reply(messages) -> str | None` chooses the text (None: the default reply, which echoes the
    first fenced code block of the last user message, or names the prompt). Injected failures:
    `failure_rate` of the attempts fail with one of `failure_kinds` ("429", "500", "timeout"),
    decided by a hash of (seed, prompt, attempt), so a run is reproducible; a 429 carries
    `retry_after_s`.
    """

    name = "mock"

    def __init__(self, delay_ms: float = 100.0, seed: int = 0, *, model: str = "mock",
                 reply: Callable[[Messages], str | None] | None = None, failure_rate: float = 0.0,
                 failure_kinds: Sequence[str] = ("429", "500", "timeout"),
                 retry_after_s: float = 0.05) -> None:
        if delay_ms < 0 or not 0.0 <= failure_rate <= 1.0:
            raise ValueError("delay_ms must be >= 0 and failure_rate within 0..1")
        for kind in failure_kinds:
            if kind not in ("429", "500", "timeout"):
                raise ValueError(f"failure kind {kind!r}: must be 429, 500 or timeout")
        self.delay_s = delay_ms / 1000.0
        self.seed = seed
        self.model = model
        self.reply = reply
        self.failure_rate = failure_rate
        self.failure_kinds = tuple(failure_kinds)
        self.retry_after_s = retry_after_s
        self.calls = 0
        self._attempts: dict[str, int] = {}

    async def complete(self, messages: Messages, *, temperature: float | None = None,
                       max_output_tokens: int | None = None) -> Completion:
        import asyncio  # here, not at the top: config's URL check imports this module
        self.calls += 1
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        key = hashlib.sha256(f"{self.seed}\0{prompt}".encode()).hexdigest()
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        if self.failure_rate:
            rng = random.Random(f"{key}:{attempt}")
            if rng.random() < self.failure_rate:
                kind = rng.choice(self.failure_kinds)
                if kind == "timeout":
                    await asyncio.sleep(3600.0)  # the collector's timeout ends it
                await asyncio.sleep(self.delay_s)
                if kind == "429":
                    raise ProviderError("mock: 429 rate limited", status=429, retryable=True,
                                        retry_after=self.retry_after_s)
                raise ProviderError("mock: 500 internal error", status=500, retryable=True)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = self.reply(messages) if self.reply is not None else None
        if text is None:
            text = _default_reply(messages, key)
        if max_output_tokens is not None and estimate_tokens(text) > max_output_tokens:
            text = text[:max_output_tokens * 4]
        return Completion(text, estimate_tokens(prompt), estimate_tokens(text))

    async def aclose(self) -> None:
        return None


def _default_reply(messages: Messages, key: str) -> str:
    last = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    start = last.find("```")
    if start >= 0:
        end = last.find("```", start + 3)
        if end > start:
            return last[start:end + 3]
    return f"Mock answer {key[:8]} to: {' '.join(last.split())[:120]}"


# -- HTTP --------------------------------------------------------------------------------------

class _HTTPProvider:
    """What the two HTTP providers share: a pooled aiohttp session per event loop, TLS always
    verified, errors mapped to ProviderError with the key cut out and secrets redacted."""

    name = "http"
    path = ""

    def __init__(self, *, model: str, api_key: str | None, base_url: str,
                 allow_http: bool = False, max_connections: int = 100) -> None:
        problem = check_base_url(base_url, allow_http)
        if problem is not None:
            raise ValueError(f"base URL {scrub(base_url, [api_key or ''])!r}: {problem}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or ""
        self.max_connections = max_connections
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, messages: list[dict[str, str]], temperature: float | None,
              max_output_tokens: int | None) -> dict[str, Any]:
        raise NotImplementedError

    def _parse(self, data: Any) -> Completion:
        raise NotImplementedError

    def _session_for_loop(self) -> Any:
        import asyncio

        import aiohttp  # lazily: `heidi tick` never pays for it
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # The default connector verifies certificates; nothing here can turn that off.
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=True)
            self._loop = loop
        return self._session

    async def complete(self, messages: Messages, *, temperature: float | None = None,
                       max_output_tokens: int | None = None) -> Completion:
        import aiohttp
        import orjson
        session = self._session_for_loop()
        body = orjson.dumps(self._body(to_messages(messages), temperature, max_output_tokens))
        url = self.base_url + self.path
        try:
            async with session.post(url, data=body, headers=self._headers()) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers) if status >= 400 else None
        except aiohttp.ClientError as exc:
            raise ProviderError(self._clean(f"{self.name}: connection error: {type(exc).__name__}: {exc}"),
                                retryable=True) from None
        if status >= 400:
            detail = _error_detail(raw)
            raise ProviderError(self._clean(f"{self.name}: HTTP {status}: {detail}"), status=status,
                                retryable=status in RETRYABLE_STATUS, retry_after=retry_after)
        try:
            return self._parse(orjson.loads(raw))
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            # A cut-off or garbled body (a proxy hiccup) may well come out right next time.
            # scrubbed whole (within SCRUB_WINDOW), then cut: a key that straddled a cut
            # would leave its first characters in the error
            raise ProviderError(self._clean(f"{self.name}: malformed response ({type(exc).__name__}): "
                                            f"{raw[:SCRUB_WINDOW].decode('utf-8', 'replace')}"),
                                status=status, retryable=True) from None

    def _clean(self, text: str) -> str:
        return scrub(text, [self._api_key])

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


def _error_detail(raw: bytes) -> str:
    """The provider's own message from an error body ({"error": {"message": ...}} in both APIs)."""
    import orjson
    try:
        data = orjson.loads(raw)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return data["message"]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    # the whole body (within SCRUB_WINDOW): scrub() removes the key before it cuts the error
    return raw[:SCRUB_WINDOW].decode("utf-8", "replace") or "(empty body)"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class OpenAIProvider(_HTTPProvider):
    """OpenAI-compatible `POST {base_url}/chat/completions` (OpenAI, vLLM, Ollama, llama.cpp
    server, TGI, Groq, Together, OpenRouter, Mistral, xAI ...). base_url includes /v1, as in the
    OpenAI SDK."""

    name = "openai"
    path = "/chat/completions"

    def __init__(self, *, model: str = DEFAULT_MODELS["openai"], api_key: str | None = None,
                 base_url: str = OPENAI_BASE_URL, allow_http: bool = False,
                 max_connections: int = 100) -> None:
        super().__init__(model=model, api_key=api_key, base_url=base_url, allow_http=allow_http,
                         max_connections=max_connections)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _body(self, messages: list[dict[str, str]], temperature: float | None,
              max_output_tokens: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if temperature is not None:
            body["temperature"] = temperature
        if max_output_tokens is not None:
            body["max_tokens"] = max_output_tokens
        return body

    def _parse(self, data: Any) -> Completion:
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise ValueError("choices[0].message.content is not a string")
        usage = data.get("usage") or {}
        return Completion(text, _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


class AnthropicProvider(_HTTPProvider):
    """Anthropic Messages API, `POST {base_url}/v1/messages` (base_url without /v1, as in the
    Anthropic SDK). System messages become the top-level `system`."""

    name = "anthropic"
    path = "/v1/messages"

    def __init__(self, *, model: str = DEFAULT_MODELS["anthropic"], api_key: str | None = None,
                 base_url: str = ANTHROPIC_BASE_URL, allow_http: bool = False,
                 max_connections: int = 100) -> None:
        super().__init__(model=model, api_key=api_key, base_url=base_url, allow_http=allow_http,
                         max_connections=max_connections)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def _body(self, messages: list[dict[str, str]], temperature: float | None,
              max_output_tokens: int | None) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_output_tokens or 1024,
                                "messages": [m for m in messages if m.get("role") != "system"]}
        if system:
            body["system"] = system
        if temperature is not None:
            body["temperature"] = temperature
        return body

    def _parse(self, data: Any) -> Completion:
        blocks = data["content"]
        if not isinstance(blocks, list):
            raise ValueError("content is not a list")
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        usage = data.get("usage") or {}
        return Completion(text, _int(usage.get("input_tokens")), _int(usage.get("output_tokens")))
