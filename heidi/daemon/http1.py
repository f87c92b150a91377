"""HTTP/1.1 messages for the daemon's transport: the request head parsed as http.server reads it
(latin-1, the same limits), the body's framing checked, and responses rendered with the headers
every answer of the API carries."""
from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

import orjson

MAX_HEAD_BYTES = 64 * 1024   # request line + headers, as http.server's line limit
MAX_HEADERS = 100
MAX_BODY_BYTES = 64 * 1024
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class Headers:
    """Request headers in arrival order; get() is case-insensitive and returns the first."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.items:
            if key.lower() == name:
                return value
        return default


@dataclass
class Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    body: bytes
    close: bool  # the client asked to close after the response (or speaks HTTP/1.0)


@dataclass
class Response:
    code: int
    body: bytes
    ctype: str
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False


def error_response(code: int, message: str) -> Response:
    return Response(code, orjson.dumps({"error": message}) + b"\n", "application/json", close=True)


def render(resp: Response, server_name: str, close: bool, head_only: bool) -> bytes:
    """Status line, the headers every response carries, then the body (none for HEAD)."""
    try:
        phrase = HTTPStatus(resp.code).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {resp.code} {phrase}", f"Server: {server_name}",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {resp.ctype}",
             f"Content-Length: {len(resp.body)}", "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff"]
    lines += [f"{key}: {value}" for key, value in resp.headers.items()]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return head if head_only else head + resp.body


class BadRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def head_end(buf: bytearray) -> tuple[int, int]:
    """(end of the head, start of the body), or (-1, -1) while the blank line has not come."""
    found = [(i, i + len(sep)) for sep in (b"\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(found) if found else (-1, -1)


def parse_head(raw: bytes) -> tuple[str, str, tuple[int, int], Headers, bool]:
    """Request line and headers (latin-1, as http.server reads them); _Bad for what it refuses."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]
    words = lines[0].decode("latin-1").split()
    if len(words) != 3:
        raise BadRequest(400, f"Bad request syntax ({lines[0][:100].decode('latin-1')!r})")
    method, target, version = words
    try:
        if not version.startswith("HTTP/"):
            raise ValueError
        major, minor = version[5:].split(".")
        if not (major.isdigit() and minor.isdigit() and len(major) < 10 and len(minor) < 10):
            raise ValueError
        number = (int(major), int(minor))
    except ValueError:
        raise BadRequest(400, f"Bad request version ({version[:40]!r})") from None
    if number >= (2, 0):
        raise BadRequest(505, f"Invalid HTTP version ({version[:40]})")
    if method not in METHODS:
        raise BadRequest(501, f"Unsupported method ({method[:40]!r})")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, "Too many headers")
    items = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "folded header lines are not accepted")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise BadRequest(400, "bad header line")
        items.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    headers = Headers(items)
    close = number < (1, 1)
    conntype = (headers.get("Connection") or "").lower()
    if conntype == "close":
        close = True
    elif conntype == "keep-alive":
        close = False
    if target.startswith("//"):  # as http.server: never read as a scheme-relative URL
        target = "/" + target.lstrip("/")
    return method, target, number, headers, close


def body_length(headers: Headers) -> int:
    """Content-Length, within MAX_BODY_BYTES; _Bad for chunked, invalid or oversized bodies."""
    if headers.get("Transfer-Encoding"):
        raise BadRequest(411, "a body needs Content-Length (no chunked bodies)")
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()):
        raise BadRequest(400, "invalid Content-Length")
    if int(raw) > MAX_BODY_BYTES:
        raise BadRequest(413, f"body over {MAX_BODY_BYTES} bytes")
    return int(raw)
