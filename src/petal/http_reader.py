"""http(s) reads under petal's URI policy.

A URI from a CSV is data, not trust: `http://169.254.169.254/...` (a cloud metadata
service), `http://localhost:6379/` or a router's admin page must not be fetched just
because a row names it. So every http(s) read here:

- connects only to global (publicly routable) addresses: loopback, link-local, private,
  shared (100.64.0.0/10, carrier-grade NAT), reserved and multicast addresses are refused.
  The check is made on the address actually connected to (the name is resolved once and
  that address is used), and again on every redirect hop;
- speaks TLS for https://, verifying the certificate and the host name (the system's CAs,
  or $SSL_CERT_FILE / $SSL_CERT_DIR);
- follows redirects only to http(s)://;
- has short time-outs (connect, each read) and a deadline for the whole fetch, enforced
  while a read is blocked (a server dripping a byte at a time is cut at the deadline), and
  the same size cap as a local file.

`PETAL_ALLOW_PRIVATE_URLS` lifts the address rule where the user means it: `all`, or a
comma-separated list of networks (`10.0.0.0/8,127.0.0.1/32`).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request

from petal.errors import ImageError, PetalError

ALLOW_ENV = "PETAL_ALLOW_PRIVATE_URLS"
CONNECT_TIMEOUT_S = 10.0  # to open the connection, and for each read after it
TOTAL_TIMEOUT_S = 60.0  # for the whole fetch, redirects and body included: a server dripping bytes is cut off
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
    if not ip.is_global:  # e.g. 100.64.0.0/10 (carrier-grade NAT, some clouds' metadata), 192.0.0.0/24
        return "an address that is not globally routable"
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


class _Fetch:
    """One fetch's sockets and deadline: at the deadline every socket it opened is shut down,
    which ends a read blocked on a dripping server (the per-read time-out alone would not)."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.cut = False
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.cut:
                _shutdown(sock)

    def cut_off(self) -> None:
        with self._lock:
            self.cut = True
            for sock in self.sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket (whose override drops its TLS state
    # under a reader in another thread): the reader sees end of stream
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


@functools.lru_cache(maxsize=4)
def _tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """A verifying context (certificate chain and host name); the system's CAs, or the
    $SSL_CERT_FILE / $SSL_CERT_DIR named here (the key of the cache)."""
    return ssl.create_default_context(cafile=cafile, capath=capath)


def tls_context() -> ssl.SSLContext:
    return _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


class _CheckedConnection(http.client.HTTPConnection):
    """Connects to the checked address of its host, under its fetch's deadline."""

    def __init__(self, *args, fetch: _Fetch, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fetch = fetch

    def connect(self) -> None:
        ip = checked_address(self.host, self.port)
        self.sock = socket.create_connection((ip, self.port), self.timeout)
        self.fetch.add(self.sock)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """The same, then TLS: the certificate is verified for the host's name, not the address."""

    def __init__(self, *args, fetch: _Fetch, **kwargs) -> None:
        super().__init__(*args, context=tls_context(), **kwargs)
        self.fetch = fetch

    def connect(self) -> None:
        ip = checked_address(self.host, self.port)
        raw = socket.create_connection((ip, self.port), self.timeout)
        self.fetch.add(raw)
        try:
            self.sock = self._context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__()
        self.fetch = fetch

    def http_open(self, req):
        return self.do_open(functools.partial(_CheckedConnection, fetch=self.fetch), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, fetch: _Fetch) -> None:
        super().__init__()
        self.fetch = fetch

    def https_open(self, req):
        return self.do_open(functools.partial(_CheckedHTTPSConnection, fetch=self.fetch), req)


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS  # each hop connects through the handlers above: checked again

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):  # urllib would follow one to ftp://
            raise ImageError(f"refused: a redirect to {scheme}:// (only http:// and https:// are followed)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def http_read(uri: str, max_bytes: int, too_large_hint: str = "") -> bytes:
    """The body at `uri`, at most `max_bytes`; ImageError with the reason otherwise (past the
    size: "file too large", then `too_large_hint`, e.g. how to raise the cap)."""
    fetch = _Fetch()
    opener = urllib.request.build_opener(_HTTPHandler(fetch), _HTTPSHandler(fetch), _Redirects)
    watchdog = threading.Timer(TOTAL_TIMEOUT_S, fetch.cut_off)
    watchdog.daemon = True
    watchdog.start()
    try:
        return _read(opener, uri, max_bytes, fetch, too_large_hint)
    finally:
        watchdog.cancel()


def _read(opener: urllib.request.OpenerDirector, uri: str, max_bytes: int, fetch: _Fetch, hint: str) -> bytes:
    too_slow = ImageError(f"too slow: not read within {TOTAL_TIMEOUT_S:.0f} s")
    try:
        with opener.open(urllib.request.Request(uri, headers={"User-Agent": "petal"}),
                         timeout=CONNECT_TIMEOUT_S) as response:
            parts, size = [], 0
            while chunk := response.read(CHUNK):
                parts.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"file too large: over {max_bytes:,} bytes {hint}".rstrip())
            if fetch.cut:  # the watchdog ended the body early
                raise too_slow
            return b"".join(parts)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a cut-off socket raised
        if fetch.cut:
            raise too_slow from None
        raise _reason(e) from None


def _reason(e: Exception) -> Exception:
    """A fetch's failure as the item's ImageError (petal's own bugs pass through)."""
    if isinstance(e, urllib.error.HTTPError):
        return ImageError(f"HTTP {e.code} {e.reason}")
    if isinstance(e, urllib.error.URLError):
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            return ImageError(f"TLS certificate refused: {e.reason.verify_message or e.reason}")
        return ImageError(f"cannot fetch: {e.reason}")
    if isinstance(e, TimeoutError):
        return ImageError(f"timed out after {CONNECT_TIMEOUT_S:.0f} s without an answer")
    if isinstance(e, (OSError, http.client.HTTPException)):
        return ImageError(f"cannot fetch: {type(e).__name__}: {e}")
    return e
