"""http(s) reads under petal's URI policy.

A URI from a CSV is data, not trust: `http://169.254.169.254/...` (a cloud metadata
service), `http://localhost:6379/` or a router's admin page must not be fetched just
because a row names it. So every http(s) read here:

- connects only to public addresses: loopback, link-local, private, reserved and multicast
  addresses are refused. The check is made on the address actually connected to (the name
  is resolved once and that address is used), and again on every redirect hop;
- has short time-outs (connect, each read, and the whole read) and the same size cap as a
  local file.

`PETAL_ALLOW_PRIVATE_URLS` lifts the address rule where the user means it: `all`, or a
comma-separated list of networks (`10.0.0.0/8,127.0.0.1/32`).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import time
import urllib.error
import urllib.request

from petal.errors import ImageError, PetalError

ALLOW_ENV = "PETAL_ALLOW_PRIVATE_URLS"
CONNECT_TIMEOUT_S = 10.0  # to open the connection, and for each read after it
TOTAL_TIMEOUT_S = 60.0  # for the whole body: a server dripping bytes is cut off
MAX_REDIRECTS = 5
CHUNK = 1 << 20

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """The networks the user opened with $PETAL_ALLOW_PRIVATE_URLS; None: all of them."""
    value = os.environ.get(ALLOW_ENV, "").strip()
    if value.lower() in ("all", "1", "true", "yes"):
        return None
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()]
    except ValueError as e:
        raise PetalError(f"{ALLOW_ENV}: expected 'all' or networks such as 10.0.0.0/8, got {value!r} ({e})") from None


def refusal(ip: Address) -> str | None:
    """Why petal does not connect to this address by default, or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None


def checked_address(host: str, port: int) -> str:
    """Resolve `host` and return the address to connect to; raise ImageError if policy refuses it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ImageError(f"cannot resolve host {host!r} ({e.strerror or e})") from None
    ip = ipaddress.ip_address(infos[0][4][0].split("%")[0])
    why = refusal(ip)
    networks = allowed_networks() if why else []
    if why and networks is not None and not any(ip in n for n in networks):
        raise ImageError(f"refused: {host} is {why} ({ip}); URIs may only name public hosts "
                         f"(set {ALLOW_ENV} to allow it)")
    return str(ip)


class _CheckedConnection(http.client.HTTPConnection):
    """Connects to the checked address of its host (HTTPS then wraps the socket with the host's name)."""

    def connect(self) -> None:
        ip = checked_address(self.host, self.port)
        self.sock = socket.create_connection((ip, self.port), self.timeout)


class _CheckedHTTPSConnection(_CheckedConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS  # each hop connects through the handlers above: checked again


def http_read(uri: str, max_bytes: int) -> bytes:
    """The body at `uri`, at most `max_bytes`; ImageError with the reason otherwise."""
    opener = urllib.request.build_opener(_HTTPHandler, _HTTPSHandler, _Redirects)
    start = time.monotonic()
    try:
        with opener.open(urllib.request.Request(uri, headers={"User-Agent": "petal"}),
                         timeout=CONNECT_TIMEOUT_S) as response:
            parts, size = [], 0
            while chunk := response.read(CHUNK):
                parts.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"file too large: over {max_bytes:,} bytes")
                if time.monotonic() - start > TOTAL_TIMEOUT_S:
                    raise ImageError(f"too slow: not read within {TOTAL_TIMEOUT_S:.0f} s")
            return b"".join(parts)
    except urllib.error.HTTPError as e:
        raise ImageError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageError(f"cannot fetch: {e.reason}") from None
    except TimeoutError:
        raise ImageError(f"timed out after {CONNECT_TIMEOUT_S:.0f} s without an answer") from None
    except (OSError, http.client.HTTPException) as e:
        raise ImageError(f"cannot fetch: {type(e).__name__}: {e}") from None
