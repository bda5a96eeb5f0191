"""The API server's engine: tokenize and validate in this process, generate in the engine core processes.

`generate()` is an async iterator of cumulative `RequestOutput` snapshots (the shapes `LLM.generate`
returns). Outputs arrive from the engine client's receive task, go through the same OutputProcessor as
the offline `LLM` (detokenization, stop strings), and land in one collector per request. A consumer that
stops iterating (client disconnect) aborts its request in the engine, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import msgspec

from elastic.config import EngineConfig
from elastic.frontend.engine_client import (EngineCoreClient, EngineDeadError, EngineHandle, EngineStartupError,
                                            FrontendAddresses)
from elastic.frontend.input_processor import InputProcessor
from elastic.frontend.output_processor import OutputProcessor
from elastic.metrics import ServerMetrics
from elastic.outputs import RequestOutput
from elastic.protocol.from_engine import EngineCoreOutputs
from elastic.protocol.scaling import ACTIVE, LEAVING, Membership, MigratedRequest
from elastic.protocol.to_engine import EngineCoreRequest
from elastic.sampling_params import SamplingParams
from elastic.tokenizer import load_tokenizer
from elastic.validation import validate_request

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EngineNotReadyError", "EngineStartupError", "RequestAbortedError",
           "RequestFailedError", "RequestRejectedError"]


class EngineNotReadyError(RuntimeError):
    """The engine is still starting (or has stopped)."""


class RequestAbortedError(RuntimeError):
    """`abort()` was called while a consumer was waiting for outputs."""


class RequestRejectedError(ValueError):
    """The engine core refused the request (it re-validates what the front end checked)."""


class RequestFailedError(RuntimeError):
    """The engine core failed this request alone (finish_reason "error"), e.g. its sampling broke."""


class _Collector:
    """Latest snapshot of one request. Snapshots are cumulative, so a slow reader just sees fewer, larger
    steps, and memory stays bounded however far behind it falls."""

    def __init__(self) -> None:
        self.output: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self.output = output
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            if self.error is not None:
                raise self.error
            self.event.clear()
            await self.event.wait()
        output, self.output = self.output, None
        return output


@dataclass
class _Sample:
    """One engine request (one of the n samples): where it runs, what to re-submit should that engine leave
    (elastic scale-down), and its timing for TTFT / ITL metrics."""

    engine_index: int
    request: EngineCoreRequest
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class _RequestState:
    request_id: str
    engine_index: int  # where it was sent first; each sample's engine is in `samples` (requests can move)
    num_prompt_tokens: int
    arrival: float  # time.monotonic()
    collector: _Collector = field(default_factory=_Collector)
    samples: dict[str, _Sample] = field(default_factory=dict)  # engine request id -> timing
    finished: bool = False


class AsyncLLM:
    def __init__(self, config: EngineConfig, *, metrics: ServerMetrics | None = None, address: str | None = None,
                 handshake_port: int = 0, log_level: str = "INFO", frontend: FrontendAddresses | None = None) -> None:
        self.config = config
        # skip_tokenizer_init: token ids in and out (e.g. benchmarks of dummy-weight models without a tokenizer)
        self.tokenizer = None if config.model.skip_tokenizer_init else load_tokenizer(config.model.tokenizer)
        self.input_processor = InputProcessor(self.tokenizer, config.model)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.metrics = metrics
        self.client = EngineCoreClient(config, on_outputs=self._on_outputs, on_engine_dead=self._on_engine_dead,
                                       address=address, handshake_port=handshake_port, log_level=log_level,
                                       frontend=frontend)
        self.client.on_membership = self._on_membership
        self.client.on_engine_lost = self._on_engine_lost
        self.requests: dict[str, _RequestState] = {}
        # Fault recovery: engine request id -> its request, waiting for a rank to re-run on (its rank died,
        # or it arrived while none could take it), and when it started waiting.
        self.parked: dict[str, tuple[_RequestState, float]] = {}
        self.rerun_task: asyncio.Task | None = None
        self.on_rerun: Callable[[int], None] | None = None  # elastic:requests_rerun_total
        self.sample_owner: dict[str, _RequestState] = {}  # engine request id -> its request
        self.startup_error: str | None = None
        self.draining = False  # shutting down: no new requests, the ones in flight may finish

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.client.start()
        except EngineStartupError as e:
            self.startup_error = str(e)
            raise
        if self.metrics is not None:  # every series exists (at 0) from the start, for scrapers and autoscalers
            for engine in self.client.engines:
                self.metrics.engine(engine.index)

    async def shutdown(self) -> None:
        # Free the engines first: with several API servers they outlive this one, and a DP rank can only
        # leave between request waves.
        for state in list(self.requests.values()):
            self.client.abort(state.engine_index, list(state.samples))
        await self.client.shutdown()
        self._fail_all(EngineNotReadyError("the server is shutting down"))

    async def drain(self, timeout: float) -> int:
        """Refuse new requests, give those in flight up to `timeout` s, then end the rest with an error
        (streams get an error event and [DONE]). Returns how many were cut short."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        states = list(self.requests.values())
        for state in states:
            self._abort_in_engines(state, self.output_processor.remove(state.request_id))
        self._fail_all(EngineNotReadyError(f"the server is shutting down: the request did not finish within "
                                           f"the shutdown timeout ({timeout:g} s)"))
        return len(states)

    @property
    def is_ready(self) -> bool:
        return self.client.is_ready and self.client.dead_reason is None

    def status(self) -> str | None:
        """None when serving, else why not (for /health and 503 bodies)."""
        if self.client.dead_reason is not None:
            return f"the engine is dead: {self.client.dead_reason}"
        if self.startup_error is not None:
            return f"the engine failed to start: {self.startup_error}"
        if self.client.closed or self.draining:
            return "the server is shutting down"
        if not self.client.is_ready and not (self.client.started and self.client.recovering):
            return "the engine is starting; retry shortly"
        return None

    def readiness(self) -> str | None:
        """None when requests are served now (GET /ready), else why not. While a dead rank is recovered
        the server is live (/health) but not ready: requests are accepted and wait for a rank."""
        reason = self.status()
        if reason is None and (any(e.lost for e in self.client.by_id.values()) or self.parked):
            return "recovering from a failed rank; requests wait for it"
        return reason

    def check_ready(self) -> None:
        reason = self.status()
        if reason is None:
            return
        raise EngineDeadError(reason) if self.client.dead_reason else EngineNotReadyError(reason)

    # ---- requests -------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine core's own checks, done here so the client gets a 400 before anything is queued."""
        self.input_processor.check_length(len(prompt_token_ids), params)
        ready = [e.num_kv_blocks for e in self.client.engines if e.ready]
        validate_request(prompt_token_ids, params, self.config.model, min(ready) if ready else None,
                         self.config.cache.block_size)

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots until the request finishes. Closing the iterator early aborts it."""
        self.check_ready()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        try:
            engine: EngineHandle | None = self.client.pick_engine()
        except EngineDeadError:
            # None routable: a rank is being recovered, or one just became unreachable and the news of its
            # death is on its way (`_send` took it out of routing). A recovering server lets the request wait
            # for a rank (the re-run loop's deadline fails it if none comes), as `_send` does.
            if not (self.client.recovering or self.client.recovers):
                raise
            engine = None
        index = engine.index if engine is not None else -1
        reqs = self.input_processor.make_requests(request_id, prompt_token_ids, params)
        state = _RequestState(request_id, index, len(prompt_token_ids), time.monotonic(),
                              samples={r.request_id: _Sample(index, r) for r in reqs})
        self.output_processor.add_request(request_id, prompt, prompt_token_ids, [r.request_id for r in reqs],
                                          [r.sampling_params for r in reqs])
        self.requests[request_id] = state
        for rid in state.samples:
            self.sample_owner[rid] = state
        try:
            if engine is None:
                self._park(state, list(state.samples))
            else:
                self._send(engine, state, reqs)
            while True:
                output = await state.collector.get()
                yield output
                if output.finished:
                    return
        finally:
            if not state.finished:  # the consumer went away (or failed): free the engine's resources
                self._abort(state)

    def _send(self, engine: EngineHandle, state: _RequestState, reqs: list) -> None:
        try:
            try:
                self.client.add_requests(engine, reqs)
            except EngineDeadError:
                if engine.dead_reason is not None:
                    raise
                # Unreachable but not dead: it left the layout (elastic scale-down) before our membership
                # record said so, or it died and the news is on its way. Another engine takes the request;
                # with none, a recovering server lets it wait for one.
                engine.state = LEAVING
                try:
                    engine = self.client.pick_engine(exclude=engine.index)
                except EngineDeadError:
                    if not self.client.recovers:
                        raise
                    self._park(state, list(state.samples))
                    return
                for sample in state.samples.values():
                    sample.engine_index = engine.index
                self.client.add_requests(engine, reqs)
        except EngineDeadError:
            self._forget(state)
            state.finished = True
            raise

    def abort(self, request_id: str) -> None:
        state = self.requests.get(request_id)
        if state is not None and not state.finished:
            self._abort(state)
            state.collector.fail(RequestAbortedError(f"request {request_id} was aborted"))

    def _abort(self, state: _RequestState) -> None:
        child_ids = self.output_processor.remove(state.request_id)
        self._abort_in_engines(state, child_ids)
        logger.info("aborted request %s (its client went away)", state.request_id)
        if self.metrics is not None:
            now = time.monotonic()
            for rid in child_ids:
                self.metrics.record_finished(state.samples[rid].engine_index, "abort", now - state.arrival,
                                             state.num_prompt_tokens, 0)
        self._forget(state)
        state.finished = True

    def _abort_in_engines(self, state: _RequestState, child_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for rid in child_ids:
            by_engine.setdefault(state.samples[rid].engine_index, []).append(rid)
        for engine, ids in by_engine.items():
            self.client.abort(engine, ids)

    def _forget(self, state: _RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for rid, sample in state.samples.items():
            self.sample_owner.pop(rid, None)
            self.client.release(sample.engine_index, 1)

    # ---- elastic scaling: requests that leave a departing engine --------------------------------------------
    def _migrate(self, from_engine: int, migrated: list[MigratedRequest]) -> None:
        """Re-submit each to another engine: the prompt plus the tokens already streamed to the client (the
        engine re-prefills them) and, when seeded, the generator's state, so the stream goes on with no gap,
        no duplicate and (greedy or seeded) the tokens it would have had."""
        leaving = self.client.by_id.get(from_engine)
        if leaving is not None and leaving.state == ACTIVE:
            leaving.state = LEAVING  # it says so itself before our membership record may (several API servers)
        num_moved = mid_stream = 0
        for moved in migrated:
            state = self.sample_owner.get(moved.request_id)
            if state is None or state.finished or state.samples[moved.request_id].engine_index != from_engine:
                continue  # finished meanwhile (a stop string), or already moved
            sample = state.samples[moved.request_id]
            params = sample.request.sampling_params
            if moved.output_token_ids and params.prompt_logprobs is not None:  # delivered with the first token
                params = msgspec.structs.replace(params, prompt_logprobs=None)
            request = msgspec.structs.replace(sample.request, sampling_params=params,
                                              resumed_token_ids=moved.output_token_ids,
                                              generator_state=moved.generator_state)
            try:
                engine = self.client.pick_engine(exclude=from_engine)
                self.client.release(from_engine, 1)
                sample.engine_index = engine.index
                self.client.add_requests(engine, [request])
            except EngineDeadError as e:
                self._fail_one(from_engine, moved.request_id, e)
                continue
            num_moved += 1
            mid_stream += bool(moved.output_token_ids)
        if num_moved:
            logger.info("engine core %d is leaving: %d request(s) moved to other engines (%d mid-stream)",
                        from_engine, num_moved, mid_stream)

    # ---- fault recovery: requests of a rank that died ------------------------------------------------------
    def _on_engine_lost(self, engine_index: int) -> None:
        """A rank died and the server recovers: its requests re-run on another rank from what this front end
        has streamed (prompt + tokens so far), so streams continue with no gap and no duplicate. Outputs
        still queued from the dead rank are dropped (its samples no longer point at it)."""
        for state in list(self.requests.values()):
            lost = [rid for rid, s in state.samples.items() if s.engine_index == engine_index]
            if lost and not state.finished:
                self.client.release(engine_index, len(lost))
                self._park(state, lost, rerun=False)
        self._rerun_parked()

    def _park(self, state: _RequestState, request_ids: list[str], rerun: bool = True) -> None:
        now = time.monotonic()
        for rid in request_ids:
            state.samples[rid].engine_index = -1
            self.parked[rid] = (state, now)
        if rerun:
            self._rerun_parked()
        if self.parked and (self.rerun_task is None or self.rerun_task.done()):
            self.rerun_task = asyncio.get_running_loop().create_task(self._rerun_loop(), name="rerun")

    async def _rerun_loop(self) -> None:
        """Until every parked request runs again: a survivor takes them at once; after a single engine's
        death they wait for its replacement. Past the deadline (no rank came back) they fail."""
        deadline_s = 3 * self.config.parallel.scale_phase_timeout
        while self.parked:
            await asyncio.sleep(0.05)
            self._rerun_parked()
            now = time.monotonic()
            for rid, (state, since) in list(self.parked.items()):
                if now - since > deadline_s:
                    del self.parked[rid]
                    self._fail_one(-1, rid, EngineDeadError(f"no engine could take the request within "
                                                            f"{deadline_s:g}s of its rank's failure"))

    def _rerun_parked(self) -> None:
        num = 0
        for rid, (state, since) in list(self.parked.items()):
            if state.finished:
                del self.parked[rid]
                continue
            try:
                engine = self.client.pick_engine()
            except EngineDeadError:
                break  # none routable yet
            sample = state.samples[rid]
            tokens = self.output_processor.token_ids(rid)
            params = sample.request.sampling_params
            if tokens and params.prompt_logprobs is not None:  # delivered with the first token
                params = msgspec.structs.replace(params, prompt_logprobs=None)
            request = msgspec.structs.replace(sample.request, sampling_params=params, resumed_token_ids=tokens,
                                              generator_state=None)
            try:
                self.client.add_requests(engine, [request])
            except EngineDeadError:
                break  # it died meanwhile: the next try picks another
            del self.parked[rid]
            sample.engine_index = engine.index
            num += bool(tokens) or state.engine_index >= 0
        if num:
            logger.info("re-ran %d request(s) of a failed rank on other ranks", num)
            if self.on_rerun is not None:
                self.on_rerun(num)

    def _on_membership(self, membership: Membership, gone: list[int]) -> None:
        if self.parked:
            self._rerun_parked()  # a replacement engine may take them now
        if self.metrics is None:
            return
        for engine_id in gone:  # its series go with it (autoscalers must not count a rank that left)
            self.metrics.remove_engine(engine_id)
        for engine in self.client.engines:
            self.metrics.engine(engine.index)

    # ---- outputs (called by the engine client's receive task) ------------------------------------------
    def _on_outputs(self, batch: EngineCoreOutputs) -> None:
        now = time.monotonic()
        engine = batch.engine_index
        metrics = self.metrics
        if metrics is not None:
            if batch.scheduler_stats is not None:
                metrics.record_scheduler_stats(engine, batch.scheduler_stats)
            for seconds in (batch.queue_times or {}).values():
                metrics.record_queue_time(engine, seconds)
        if batch.migrated:
            self._migrate(engine, batch.migrated)
        if self.parked or self.client.recovering:  # outputs of a dead rank's requests that moved: stale
            batch.outputs = [eo for eo in batch.outputs if self._runs_on(eo.request_id, engine)]
        for rejected in batch.rejected or ():
            self._fail_one(engine, rejected.request_id, RequestRejectedError(rejected.error))
        if any(eo.finish_reason == "error" for eo in batch.outputs):
            for eo in batch.outputs:
                if eo.finish_reason == "error":
                    self._fail_one(engine, eo.request_id, RequestFailedError(eo.error or "the request failed"))
            batch.outputs = [eo for eo in batch.outputs if eo.finish_reason != "error"]
        if not batch.outputs:
            return
        if metrics is not None:
            self._record_token_timing(batch, now)
        snapshots, to_abort = self.output_processor.process(batch.outputs)
        if to_abort:  # stop strings, found here, end requests the engine would otherwise continue
            self.client.abort(engine, to_abort)
        for snapshot in snapshots:
            state = self.requests.get(snapshot.request_id)
            if state is None:
                continue
            if snapshot.finished:
                self._finish(state, snapshot, now)
            state.collector.put(snapshot)

    def _runs_on(self, engine_request_id: str, engine: int) -> bool:
        state = self.sample_owner.get(engine_request_id)
        return state is None or state.samples[engine_request_id].engine_index == engine

    def _fail_one(self, engine: int, engine_request_id: str, error: BaseException) -> None:
        """The engine refused or failed one engine request: its whole request fails (its other samples are
        aborted); every other request goes on."""
        state = self.sample_owner.get(engine_request_id)
        if state is None or state.finished:
            return
        logger.warning("engine core %d: request %s failed: %s", engine, engine_request_id, error)
        self._abort_in_engines(state, [r for r in self.output_processor.remove(state.request_id)
                                       if r != engine_request_id])
        self._forget(state)
        state.finished = True
        state.collector.fail(error)

    def _record_token_timing(self, batch: EngineCoreOutputs, now: float) -> None:
        assert self.metrics is not None
        for eo in batch.outputs:
            state = self.sample_owner.get(eo.request_id)
            if state is None or not eo.new_token_ids:
                continue
            sample = state.samples[eo.request_id]
            if sample.first_token_time is None:
                sample.first_token_time = now
                self.metrics.record_first_token(batch.engine_index, now - state.arrival, state.num_prompt_tokens)
                self.metrics.record_tokens(batch.engine_index, len(eo.new_token_ids), None)
            else:
                self.metrics.record_tokens(batch.engine_index, len(eo.new_token_ids),
                                           now - (sample.last_token_time or now))
            sample.last_token_time = now

    def _finish(self, state: _RequestState, snapshot: RequestOutput, now: float) -> None:
        self._forget(state)
        state.finished = True
        if self.metrics is not None:
            samples = list(state.samples.values())  # in sample (output) order
            for out in snapshot.outputs:
                self.metrics.record_finished(samples[out.index].engine_index, out.finish_reason or "stop",
                                             now - state.arrival, state.num_prompt_tokens, len(out.token_ids))

    def _on_engine_dead(self, engine_index: int, reason: str) -> None:
        self._fail_all(EngineDeadError(reason), engine_index)
        if self.metrics is not None:
            self.metrics.record_engine_gone(engine_index)

    def _fail_all(self, error: BaseException, engine_index: int | None = None) -> None:
        for state in list(self.requests.values()):
            if engine_index is None or any(s.engine_index == engine_index for s in state.samples.values()):
                self.output_processor.remove(state.request_id)
                self._forget(state)
                state.finished = True
                state.collector.fail(error)
