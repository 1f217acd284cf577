"""Run the review page: a socket bound first (so port 0 gives a free port to print), then uvicorn.

    with review_server(wb, port=0) as url:      # a thread, for tests and benchmarks
        ...
    serve_review(wb, host, port, on_url=print)  # the CLI: until Ctrl-C
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from petal.reviewing.app import create_app, new_token
from petal.reviewing.workbench import Workbench


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: an answer's headers and body go out at once, not 40 ms
    # apart (Nagle waiting on the browser's delayed ACK of a keep-alive connection)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def page_url(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    name = f"[{host}]" if ":" in host else host
    return f"http://{name}:{port}/?token={token}"


def _server(wb: Workbench, host: str, token: str):  # noqa: ANN202 - a uvicorn.Server
    import uvicorn

    config = uvicorn.Config(create_app(wb, token, host), log_level="warning", access_log=False)
    return uvicorn.Server(config)


def serve_review(wb: Workbench, host: str = "127.0.0.1", port: int = 8765, *,
                 on_url: Callable[[str], None] = print, token: str | None = None) -> None:
    """Serve the page until interrupted; `on_url(url)` once it listens (the URL holds the token)."""
    token = token or new_token()
    sock = bind(host, port)
    server = _server(wb, host, token)
    on_url(page_url(sock, host, token))
    server.run(sockets=[sock])


@contextmanager
def review_server(wb: Workbench, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> Iterator[str]:
    """The page served from a thread; yields its URL (with the token)."""
    token = token or new_token()
    sock = bind(host, port)
    server = _server(wb, host, token)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            threading.Event().wait(0.02)
        yield page_url(sock, host, token)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
