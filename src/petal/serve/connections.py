"""Connections that idle or slow clients cannot hold: time-outs counted from accept.

uvicorn times a connection out only between requests (keep-alive). A client that connects
and sends nothing, or drips its headers or body a byte at a time, holds its connection for
as long as it likes; a few hundred of them fill every slot. Here each connection must send
its request headers within `header_s` and the whole request within `body_s` of being
accepted (of the previous response, on a kept-alive connection); otherwise it is closed.
An answer being computed is never cut: the time-outs stop once the request is in.

The limit on concurrent work counts requests, not connections (`ConcurrencyLimit` in
petal.serve.limits), so idle connections no longer turn real requests into 503s.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("petal.serve")


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines per request."""

    header_s: float = 10.0
    body_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None  # what the armed deadline waits for
        super().connection_made(transport)
        self._arm(self.header_s, "request headers")

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._waiting_for == "request headers":
            self._arm(self.body_s - self.header_s + self._left(), "request body")  # body_s from the start
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in: its answer is the app's business

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is not h11.DONE:
            self._arm(self.header_s, "request headers")  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _left(self) -> float:
        """Seconds left before the armed deadline (0 if none)."""
        return max(0.0, self._deadline.when() - self.loop.time()) if self._deadline else 0.0

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(max(seconds, 0.0), self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing %s: %s not received in time", self.client, self._waiting_for)
            self.transport.close()


def timed_protocol(header_s: float, body_s: float) -> type[TimedH11Protocol]:
    """The protocol class for uvicorn's `http=`, with these deadlines."""
    return type("PetalH11Protocol", (TimedH11Protocol,), {"header_s": header_s, "body_s": body_s})
