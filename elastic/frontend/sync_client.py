"""A synchronous face on AsyncLLM, for the offline `LLM` with data parallelism.

DP ranks are separate engine-core processes stepping in lockstep, so the offline `LLM` drives them
exactly like the server does: an AsyncLLM (with its EngineCoreClient, DP coordinator and routing) runs on
an event loop in a background thread, and `generate()` blocks the caller until every request of the batch
is done. Engine processes, coordinator and sockets are cleaned up by `shutdown()`, at garbage collection,
or at interpreter exit, whichever comes first.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import threading
import weakref
from typing import Any, Callable, Coroutine, Sequence, TypeVar

from elastic.config import EngineConfig
from elastic.frontend.async_llm import AsyncLLM
from elastic.outputs import RequestOutput
from elastic.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SHUTDOWN_TIMEOUT_S = 30.0


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, engine: AsyncLLM) -> None:
    """Shut the engine down on its loop, then stop the loop (also the finalizer: no reference to self)."""
    if loop.is_closed():
        return
    if thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(_SHUTDOWN_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - whatever happened, the processes must not outlive us
            logger.warning("engine shutdown failed (%s); terminating the engine processes", e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_SHUTDOWN_TIMEOUT_S)
    engine.client.close()  # idempotent; kills what a failed shutdown left
    if not thread.is_alive():
        loop.close()


class SyncEngineClient:
    """AsyncLLM on its own event-loop thread; `generate_batch` is a blocking call."""

    def __init__(self, config: EngineConfig, log_level: str = "WARNING") -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # We are a freshly spawned engine process re-running the user's script at import time.
            raise RuntimeError("LLM(data_parallel_size > 1) starts engine processes with 'spawn', which re-imports "
                               "the main script: create the LLM under `if __name__ == '__main__':`")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="elastic-engine-loop", daemon=True)
        self.thread.start()
        self.engine = AsyncLLM(config, log_level=log_level)
        self._finalizer = weakref.finalize(self, _stop, self.loop, self.thread, self.engine)
        try:
            self.call(self.engine.start())
        except BaseException:
            self.shutdown()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the engine loop and wait; on Ctrl-C (or any error here) cancel it there."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()  # closes the request generators, which aborts their requests in the engines
            try:
                fut.result(5.0)
            except (concurrent.futures.CancelledError, Exception):
                pass
            raise

    def generate_batch(self, batch: Sequence[tuple[str, str | None, list[int], SamplingParams]],
                       on_finished: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """(request id, prompt text, prompt token ids, params) per request -> final outputs, in order."""

        async def one(request_id: str, text: str | None, token_ids: list[int],
                      params: SamplingParams) -> RequestOutput:
            final: RequestOutput | None = None
            async for output in self.engine.generate(request_id, text, token_ids, params):
                final = output
            assert final is not None and final.finished
            if on_finished is not None:
                on_finished(final)
            return final

        async def run_all() -> list[RequestOutput]:
            tasks = [asyncio.ensure_future(one(*item)) for item in batch]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                # The first failure cancels the rest (aborting them in the engines), as the single-rank
                # LLM would leave nothing queued behind an error.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        return self.call(run_all())

    def call_utility(self, engine_index: int, method: str, *args: Any) -> Any:
        return self.call(self.engine.client.call_utility(engine_index, method, *args))

    def shutdown(self) -> None:
        self._finalizer()
