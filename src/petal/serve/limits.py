"""Request limits and auth: body size (413), upload and processing timeouts (408 / 503), bearer tokens (401).

The pixel limit is enforced where images are decoded (`petal.images.open_image`,
from the header, before any pixel is allocated); the images-per-request limit
where the request is parsed.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")
U = TypeVar("U")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, length: int | None = None) -> None:
        got = f"{length:,} bytes" if length is not None else "more"
        super().__init__(413, f"request body too large: expected at most {limit:,} bytes, got {got}")


class BodySizeLimit:
    """ASGI middleware: answer 413 to a body over `max_bytes`, from its Content-Length before
    reading it, or while it streams in (chunked uploads), so at most `max_bytes` is ever buffered.

    The connection is kept open: uvicorn reads and drops the rest of a refused body (up to
    its keep-alive timeout), so a client still sending it reads the 413, not a reset.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, {"error": BodyTooLarge(self.max_bytes, int(length)).detail})
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class ConcurrencyLimit:
    """ASGI middleware: at most `max_requests` requests in the app at once; one more gets 503
    "busy" at once instead of a queue that grows without bound. It counts requests, not
    connections, so idle clients cannot use up the slots; health probes are never refused."""

    EXEMPT = ("/healthz", "/readyz", "/v2/health/", "/metrics")

    def __init__(self, app: ASGIApp, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.EXEMPT):
            return await self.app(scope, receive, send)
        if self.active >= self.max_requests:
            return await send_json(send, 503, {"error": f"server busy: {self.active} requests in progress; "
                                                        "retry later"}, [(b"retry-after", b"1")])
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def send_json(send: Send, status: int, doc: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer from raw ASGI (before the app runs)."""
    body = json.dumps(doc).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def upload_within(awaitable: Awaitable[T], seconds: float) -> T:
    """Reading the request (body or form) must finish in time: a slow client gets 408."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"request body not received within {seconds:g} s") from None
    except ClientDisconnect:
        raise HTTPException(400, "client disconnected before sending the whole body") from None


async def answer_within(awaitable: Awaitable[T], seconds: float, limit: float) -> T:
    """Decoding and inference must finish in `seconds` (what is left of the per-request
    `limit`), or the request gets 503: the server is overloaded, retry."""
    try:
        return await asyncio.wait_for(awaitable, max(seconds, 0.001))
    except asyncio.TimeoutError:
        raise HTTPException(503, f"request timed out: not answered within the {limit:g} s per-request "
                            "limit; the server is overloaded, retry later",
                            headers={"Retry-After": "1"}) from None


# When the request being answered runs out of time (time.monotonic(), the loop's clock): work
# queued for it checks this before it starts (petal.serve.service), and is skipped after it.
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


async def within_limit(receive: Awaitable[T], answer: Callable[[T], Awaitable[U]], seconds: float) -> U:
    """One time budget per request: receiving it (408 when slow), then answering it with
    whatever time is left (503 when the server is too busy to make it)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    REQUEST_DEADLINE.set(start + seconds)  # seen by the answer's task, which copies this context
    got = await upload_within(receive, seconds)
    return await answer_within(answer(got), seconds - (loop.time() - start), seconds)


def bearer_ok(authorization: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>`, compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
