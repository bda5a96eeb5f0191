"""Pipelined decode (`--async-scheduling`): the next decode step is launched before the previous step's
tokens are read, so the host's work of a step (its inputs, reading and reporting tokens, the scheduler) runs
while the device computes the step before. Each step's input tokens are the previous step's output on the
device; nothing waits for the host.

    step N launched -> step N+1 launched (inputs: N's tokens, on the device) -> N's tokens read and reported
                    -> step N+2 launched -> N+1's tokens read and reported -> ...

A request that stops at step N (its end-of-sequence token, read after N+1 was launched) has a row in N+1
whose token is dropped. The stream orders that row's cache write before any later step's, so a block the
request freed can go to another request at once: that one writes its own positions before it reads them.
Stops by length are known before a launch, so such a request is not launched again.

A launch waits as long as it can: until just before the step on its way ends (the device's time per step and
the host's per launch, measured). The engine takes inputs meanwhile (`launch_wait_s`), so a request arriving
then is admitted at the next step, as when stepping one at a time, not behind one more step launched ahead.

Only steady decoding is pipelined: every running request decodes without logprobs, penalties or bias (greedy
or sampled), and nothing waits to be admitted. Anything else (a new request, a rebalance, a scale operation)
finishes the step on its way first, and the engine steps as usual. With data parallelism, each launch is
preceded by the step's exchange with the other ranks, as a step is (`EngineCore.agree_step`): pipelined and
stepping ranks pair up step for step, and a pipelined step runs eagerly with the others' token counts when
some rank prefills. A step on its way is dropped (`abandon`) only when its requests leave or a peer rank
failed under it: their seeded generators are put back, so another engine, or this one after the recovery,
draws the same tokens.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from elastic.config import EngineConfig
from elastic.engine.block_manager import BlockManager
from elastic.engine.scheduler import Scheduler
from elastic.executor.model_runner import LaunchedDecode, ModelRunner
from elastic.layers.pinned_copy import to_device
from elastic.layers.sampler import _needs_processing
from elastic.protocol.from_engine import EngineCoreOutput, TokenLogprobs
from elastic.request import Request, RequestStatus, SchedulerOutput


class _Core(Protocol):
    """What the pipeline uses of its EngineCore (which owns it)."""

    config: EngineConfig
    runner: ModelRunner
    scheduler: Scheduler
    block_manager: BlockManager
    balancer: Any  # ExpertBalancer | None
    scale_hold: bool
    scale_sync: bool
    peer_failed: Any  # threading.Event

    def _fail(self, errors: dict[str, str]) -> None: ...

    def agree_step(self, num_tokens: int, decode_only: bool) -> Any: ...  # StepAgreement | None

    def after_step(self, agreed: Any) -> None: ...

    def report(self, updated: list[Request], logprobs: dict[str, TokenLogprobs]) -> list[EngineCoreOutput]: ...


logger = logging.getLogger(__name__)

# How long before the step on its way ends the next one is launched (beyond the launch's own time): it absorbs
# the launch's jitter; later, the device idles; earlier, a request that arrives meanwhile waits one more step.
LAUNCH_MARGIN_S = 0.001


@dataclass
class _Inflight:
    reqs: list[Request]  # the step's rows, in order
    step: LaunchedDecode
    timed: bool = True  # whether its device time predicts the next steps' (no other rank prefilled beside it)


class DecodePipeline:
    def __init__(self, core: _Core) -> None:
        self.core = core
        self.inflight: _Inflight | None = None
        self.device_s: float | None = None  # the device's time for the last timed step
        self.launch_s: float | None = None  # the host's time to launch a step (a moving average)
        self.launch_due: float | None = None  # (monotonic) the latest start of the next launch that idles nothing
        self.launched = 0  # steps launched pipelined

    def launch_wait_s(self) -> float:
        """How long the next launch can wait for inputs without leaving the device idle (0: launch now)."""
        if self.inflight is None or self.launch_due is None:
            return 0.0
        return max(0.0, self.launch_due - time.monotonic())

    def start(self) -> None:
        """After a step that read its tokens: launch the next one if the batch is steady decoding."""
        reqs = list(self.core.scheduler.running)
        self.device_s = None  # a new batch: its steps are timed afresh
        if self.inflight is None and self._steady(reqs, offset=0):
            ids = torch.tensor([r.all_token_ids[-1] for r in reqs], dtype=torch.long)
            self._launch(reqs, 0, to_device(ids, self.core.runner.device))

    def advance(self) -> list[EngineCoreOutput]:
        """Launch the step after the one on its way (if still steady), then read and report that one."""
        previous = self.inflight
        assert previous is not None
        if [id(r) for r in self.core.scheduler.running] == [id(r) for r in previous.reqs] and \
                self._steady(previous.reqs, offset=1):
            self._launch(previous.reqs, 1, previous.step.tokens)  # (if it raises, `previous` stays on its way)
        else:
            self.inflight = None
        return self._finish(previous)

    def drain(self) -> list[EngineCoreOutput]:
        """Read and report the step on its way, if any (before anything that needs the requests as they are)."""
        previous, self.inflight = self.inflight, None
        return self._finish(previous) if previous is not None else []

    def abandon(self) -> None:
        """Let the step on its way finish and drop its tokens: its requests leave, or a peer rank failed under
        it; they are computed again from the tokens reported (seeded generators are put back as they were)."""
        if self.inflight is not None:
            try:
                if self.inflight.step.done is not None:
                    self.inflight.step.done.synchronize()
            except RuntimeError:  # its collectives were aborted (a peer failed): nothing of it is used
                logger.warning("a dropped pipelined step ended in an error", exc_info=True)
            self.inflight.step.undo_draws()
        self.inflight, self.launch_due = None, None

    # ---- internals ------------------------------------------------------------------------------------------
    def _steady(self, reqs: list[Request], offset: int) -> bool:
        """Whether `reqs` (every running request) can take one more pipelined step, each at position
        num_computed_tokens + offset; allocates that position's KV slot."""
        core = self.core
        if not reqs or core.scheduler.waiting or core.scale_hold or core.scale_sync or core.peer_failed.is_set():
            return False
        if core.balancer is not None and (core.balancer.busy or core.balancer.due()):
            return False
        max_len = core.config.model.max_model_len
        for r in reqs:
            p = r.params
            if p.logprobs is not None or _needs_processing(r) or r.status != RequestStatus.RUNNING:
                return False
            if r.num_computed_tokens + 1 != r.num_tokens:  # not decoding (a prefill chunk is left)
                return False
            if r.reaches_length(offset, max_len):  # with the step(s) on the way read, one more must be allowed
                return False
        return all(core.block_manager.allocate_slots(r, 1 + offset) for r in reqs)

    def _launch(self, reqs: list[Request], offset: int, input_ids: torch.Tensor) -> None:
        """One step of `reqs`: with data parallelism, after this step's exchange with the other ranks (which may
        be stepping as usual: each launched step is one exchange on every rank, pipelined or not)."""
        agreed = self.core.agree_step(len(reqs), decode_only=True)
        assert agreed is not None  # this rank has work: the wave goes on
        began = time.perf_counter()  # (the exchange's wait for the other ranks is not launch time)
        step = self.core.runner.launch_decode(reqs, offset, input_ids, agreed.dp_num_tokens, agreed.graph)
        took = time.perf_counter() - began
        self.launch_s = took if self.launch_s is None else 0.8 * self.launch_s + 0.2 * took
        # A step another rank's prefill ran beside (its mixed-step graph, or eager) is no measure of the next ones.
        beside_prefill = agreed.dp_num_tokens is not None and (agreed.graph is None or agreed.graph.mixed)
        self.inflight = _Inflight(reqs, step, timed=not beside_prefill)
        self.core.after_step(agreed)
        self.launched += 1

    def _schedule_launch(self, read: _Inflight) -> None:
        """`read` has just ended, and the step on its way (if any) began then: the next launch is due when
        that one nearly ends, if it takes as long as the last timed one (steady decode steps of one batch
        take the same time; a batch that changed restarts the pipeline, and its timing). Unknown on the CPU
        (no device timing): launch at once."""
        seconds = read.step.device_seconds
        if seconds is not None and read.timed:
            self.device_s = seconds
        if self.inflight is None or self.device_s is None or self.launch_s is None:
            self.launch_due = None
            return
        self.launch_due = time.monotonic() + self.device_s - self.launch_s - LAUNCH_MARGIN_S

    def _finish(self, inflight: _Inflight) -> list[EngineCoreOutput]:
        """Read a launched step's tokens and report them, as a step that waited for them would have."""
        core = self.core
        try:
            tokens, finite = inflight.step.read()
            if core.peer_failed.is_set():  # collectives aborted under it: its tokens may be garbage
                raise RuntimeError("a peer rank failed during this step")
        except Exception:
            # Both void: the step launched after it first, whose generator states were saved after this one's
            # draws, then this one's, so the generators end as before this step.
            self.abandon()
            inflight.step.undo_draws()
            raise
        self._schedule_launch(inflight)
        live = [(r, tok, ok) for r, tok, ok in zip(inflight.reqs, tokens, finite)
                if r.status == RequestStatus.RUNNING and r.request_id in core.scheduler.requests]
        failed = {r.request_id: "the sampling distribution has no finite value" for r, _, ok in live if not ok}
        if failed:
            core._fail(failed)
        out = SchedulerOutput([(r, 1) for r, _, ok in live if ok])
        sampled = {r.request_id: tok for r, tok, ok in live if ok}
        return core.report(core.scheduler.postprocess(out, sampled), {})
