"""uvicorn with the graceful stop Kubernetes expects.

On SIGTERM (or Ctrl-C):
  1. not ready: /health answers 503 and new requests get a 503 "shutting down" (the port stays open, so a
     probe or a late-routed request gets an answer, not a refused connection);
  2. requests in flight get up to --shutdown-timeout seconds to finish; the ones still running then end
     with an error (a stream gets an error event, then `data: [DONE]`);
  3. uvicorn stops: listener and connections closed, lifespan shutdown (the engines stop), exit code 0.
A second signal skips the wait (a second Ctrl-C exits at once, as uvicorn does).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from elastic.frontend.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# After the drain every generation request has ended; what is left (a /tokenize, a response being flushed)
# gets this long before uvicorn cancels it.
AFTER_DRAIN_GRACE_S = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it may run anywhere in the loop's thread, so it only schedules the drain.
        if self.draining or self.loop is None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._captured_signals.append(sig)
        self.draining = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        in_flight = len(self.engine.requests)
        logger.info("shutting down: not accepting new requests; %d in flight get up to %g s to finish", in_flight,
                    self.shutdown_timeout)
        try:
            cut = await self.engine.drain(self.shutdown_timeout)
            if cut:
                logger.warning("%d request(s) did not finish within the shutdown timeout; ended with an error", cut)
            await asyncio.sleep(0.1)  # let the handlers write their last events before connections close
        finally:
            self.should_exit = True
