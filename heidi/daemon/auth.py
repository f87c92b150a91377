"""Who may use the daemon's API: the bearer token (compared in constant time), loopback-only Host
names without a token (no DNS rebinding), same-origin POSTs (no CSRF), and the bind check."""
from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import parse_qs, urlsplit

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


class Auth:
    """The API's checks for one daemon's settings (HEIDI_API_TOKEN, HEIDI_HOST)."""

    def __init__(self, config: Config) -> None:
        self._token = config.api_token.encode() if config.api_token else None
        self._host_names = {config.host.strip("[]").lower()}

    def authorized(self, header: str | None, path: str, query: str) -> bool:
        if self._token is None:
            return True
        given = b""
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip().encode("utf-8", "replace")
        elif path == "/" and query:
            # the status page may be opened as /?token=...; its own requests use the header
            try:
                given = parse_qs(query, max_num_fields=16).get("token", [""])[-1].encode("utf-8", "replace")
            except ValueError:
                given = b""
        return hmac.compare_digest(given, self._token)

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
    def origin_allowed(origin: str | None, host_header: str | None) -> bool:
        """A browser POSTing from another site carries its Origin: refuse it (CSRF)."""
        if origin is None:
            return True
        try:
            netloc = urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            return False
        return bool(netloc) and netloc == (host_header or "").strip().lower()
