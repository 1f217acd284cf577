"""Helpers for the serving tests: a real uvicorn server on a free loopback port."""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from petal.serve.config import ServeConfig
from petal.serve.server import make_server


@contextmanager
def running(config: ServeConfig) -> Iterator[tuple[str, object]]:
    """Serve `config` in a thread on 127.0.0.1; yields (base URL, the FastAPI app)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; the server uses this very socket
    port = sock.getsockname()[1]
    server = make_server(config, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded: at most ~60 s for the models to load
            if server.started or not thread.is_alive():
                break
            time.sleep(0.1)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}", server.config.app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket -> (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(head.split()[1]), body


def b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims width x height RGB pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
