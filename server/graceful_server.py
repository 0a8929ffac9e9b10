"""uvicorn.Server whose SIGTERM / SIGINT drains requests first (vLLM's shutdown contract) and exits 0."""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.runtime.config import ServerConfig
from server.access_log import redact_access_log
from server.drain import Drain

UVICORN_GRACE_SECONDS = 5  # uvicorn's own wait for connections, after our drain has ended every request


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not super(): uvicorn would stop at once (sse-starlette then cancels streams without a final
        # chunk) and re-raise the signal afterwards, so the exit status would be 143 instead of 0.
        if self.should_exit:
            self.force_exit = True  # a signal during uvicorn's own shutdown: stop waiting
        else:
            self.drain.close()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.closing and self._draining is None:
            self._draining = asyncio.create_task(self.drain.run())
        if self._draining is not None and self._draining.done():
            self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, config: ServerConfig) -> None:
    """Run the app until a signal has drained it."""
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=UVICORN_GRACE_SECONDS)
    redact_access_log()
    GracefulServer(uv_config, app.state.drain).run()
