"""Graceful shutdown: refuse new requests, let in-flight ones finish, then abort what is left.

The uvicorn side (signals) is in server/graceful_server.py; this holds the state and the ASGI gate.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.runtime.async_engine import AsyncEngine
from server.middleware import ASGIApp, Receive, Scope, Send, send_error

log = logging.getLogger("dflash.server")


class Drain:
    POLL_SECONDS = 0.05
    ABORT_GRACE_SECONDS = 10.0  # after the abort, each stream still sends its final chunk, usage and [DONE]

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.closing = False
        self.in_flight = 0  # HTTP requests inside the app, streams included
        self._hurry = False

    def close(self) -> None:
        """Called from a signal handler: only flips flags; run() does the waiting."""
        if self.closing:
            self._hurry = True  # a second signal: abort now instead of waiting out the timeout
        self.closing = True

    async def run(self) -> None:
        log.info("shutting down: %d requests in flight, waiting up to %.0f s for them", self.in_flight, self.timeout)
        if not await self._wait_idle(self.timeout):
            num = self.engine.abort_all()
            log.warning("drain timeout: aborting %d requests still running or queued", num)
            if not await self._wait_idle(self.ABORT_GRACE_SECONDS):
                log.warning("%d requests did not end after the abort", self.in_flight)
        log.info("drained")

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and not self._hurry:
            await asyncio.sleep(self.POLL_SECONDS)
        self._hurry = False
        return self.in_flight == 0


class DrainMiddleware:
    """Counts HTTP requests in flight; once draining, new ones get 503 and the connection closes."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.closing:
            return await send_error(scope, send, 503, "the server is shutting down", "server_busy",
                                    [(b"connection", b"close"), (b"retry-after", b"1")])
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
