"""Who may use the daemon's API: the bearer token (compared in constant time; or the page's
cookie, set when the page was opened as /?token=...), loopback-only Host names without a token
(no DNS rebinding), same-origin POSTs (no CSRF), and the bind check."""
from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..config import Config
from ..errors import ConfigError


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals; any other name or address is not."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(cfg: Config) -> None:
    """Refuse (ConfigError, exit 2) to serve a non-loopback address without a token."""
    if not is_loopback(cfg.host) and not cfg.api_token:
        raise ConfigError(f"HEIDI_HOST={cfg.host!r}: binding a non-loopback address requires "
                          "HEIDI_API_TOKEN; set a token or bind 127.0.0.1")


COOKIE = "heidi_token"


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie header (percent-decoded), None when absent."""
    if not header:
        return None
    for part in header.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return unquote(value.strip().strip('"'))
    return None


class Auth:
    """The API's checks for one daemon's settings (HEIDI_API_TOKEN, HEIDI_HOST)."""

    def __init__(self, config: Config) -> None:
        self._token = config.api_token.encode() if config.api_token else None
        self._host_names = {config.host.strip("[]").lower()}

    @property
    def required(self) -> bool:
        return self._token is not None

    def _matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token or b"")

    def authorized_by(self, header: str | None, path: str, query: str,
                      cookie: str | None = None) -> str | None:
        """How the request proves it may use the API: "open" (no token is set), "header"
        (Authorization: Bearer), "query" (the page opened as /?token=...), "cookie" (the page's
        cookie, set by that first visit); None when it does not."""
        if self._token is None:
            return "open"
        if header:
            scheme, _, value = header.strip().partition(" ")
            return "header" if scheme.lower() == "bearer" and self._matches(value.strip()) else None
        if path == "/" and query:
            try:
                given = parse_qs(query, max_num_fields=16).get("token", [""])[-1]
            except ValueError:
                given = ""
            if given:
                return "query" if self._matches(given) else None
        from_cookie = cookie_value(cookie, COOKIE)
        if from_cookie is not None and self._matches(from_cookie):
            return "cookie"
        return None

    def authorized(self, header: str | None, path: str, query: str, cookie: str | None = None) -> bool:
        return self.authorized_by(header, path, query, cookie) is not None

    def set_cookie(self) -> str:
        """The Set-Cookie value that lets the page's own requests, and a reload, in: the browser
        never shows it to scripts (HttpOnly) nor sends it from another site (SameSite=Strict)."""
        assert self._token is not None
        return f"{COOKIE}={quote(self._token.decode(), safe='')}; Path=/; HttpOnly; SameSite=Strict"

    def host_allowed(self, host_header: str | None) -> bool:
        """Without a token, only loopback Host names: a web page cannot DNS-rebind onto the API."""
        if self._token is not None or not host_header:
            return True
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host[1:]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        return is_loopback(host) or host in self._host_names

    @staticmethod
    def origin_allowed(origin: str | None, host_header: str | None, by_cookie: bool = False) -> bool:
        """A browser POSTing from another site carries its Origin: refuse it (CSRF). A POST let
        in by the page's cookie must name its origin, and it must be this one."""
        if origin is None:
            return not by_cookie
        try:
            netloc = urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            return False
        return bool(netloc) and netloc == (host_header or "").strip().lower()
