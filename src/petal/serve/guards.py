"""Defences against web pages that drive a server through their visitor's browser.

- DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and then talks to a
  local server as if same-origin. A server bound to loopback answers only requests whose
  `Host` is a loopback name (localhost, *.localhost, 127.0.0.0/8, [::1]); a proxy in front
  of it must pass such a Host.
- Cross-site requests: any page may POST to any address without asking (a "no-cors" fetch,
  an HTML form). Without an API key (which such a request cannot carry), a POST that the
  browser marks as coming from another site (`Sec-Fetch-Site`, or else an `Origin` naming
  another host than `Host`) is refused. Clients outside browsers send neither header.
- Content types: the JSON routes take `application/json` (the v2 route also the binary
  extension's `application/octet-stream`), or none (tritonclient sends none), never
  text/plain or a form: those are the types a page may send without a CORS preflight.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from petal.serve.limits import send_json

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(host: str) -> str:
    """A Host header -> its name, without the port: "[::1]:80" -> "::1", "a:80" -> "a"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(name: str) -> bool:
    """localhost, *.localhost (RFC 6761), or a loopback address."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cross_site(headers: Headers) -> bool:
    """The browser says this request comes from a page of another site (or an opaque origin)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")  # "none": typed in the address bar, a bookmark
    origin = headers.get("origin")
    return origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower()


def content_type_ok(value: str | None, allowed: tuple[str, ...]) -> bool:
    """No Content-Type, or one of `allowed` (parameters such as charset ignored)."""
    return value is None or value.split(";")[0].strip().lower() in allowed


class BrowserGuard:
    """ASGI middleware: 403 to a non-loopback Host on a loopback-bound server, and to a
    cross-site POST on a server without an API key."""

    def __init__(self, app: ASGIApp, *, loopback: bool, has_key: bool) -> None:
        self.app = app
        self.loopback = loopback
        self.has_key = has_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host")
        if self.loopback and host is not None and not is_loopback(host_name(host)):
            return await send_json(send, 403, {"error": (
                f"host: this server listens on loopback and answers only loopback names (localhost, 127.0.0.1, "
                f"[::1]), got {host[:100]!r}; behind a proxy, pass Host: localhost")})
        if not self.has_key and scope["method"] not in SAFE_METHODS and cross_site(headers):
            return await send_json(send, 403, {"error": (
                "cross-site request refused: a page of another site may not drive this server, which "
                "has no API key")})
        await self.app(scope, receive, send)
