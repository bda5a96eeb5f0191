"""Continuous batching with chunked prefill: each step spends a token budget on running requests
first (decodes and unfinished prefills, oldest first), then admits waiting ones. When KV blocks run out,
the newest running request is preempted: its blocks are freed and it is recomputed later."""
from __future__ import annotations

from collections import deque

from elastic.config import EngineConfig
from elastic.engine.block_manager import BlockManager
from elastic.request import Request, RequestStatus, SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.max_model_len = config.model.max_model_len
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.finish_reason = "abort"
            self._finish(req)
            aborted.append(req)
        return aborted

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(req, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.num_preempted += 1
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        if out.num_preempted:  # no admissions in a step that had to preempt
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not req.block_table:
                self.block_manager.allocate_cached_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.block_manager.allocate_slots(req, num_new):
                self.block_manager.free(req)
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def postprocess(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance progress; append the tokens sampled for requests that reached their end. Returns the
        requests with something to report (a new token or a finish)."""
        updated = []
        for req, num_new in out.scheduled:
            req.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            req.append_token(token, self.max_model_len)
            if req.finish_reason is not None:
                self.running.remove(req)
                self._finish(req)
            updated.append(req)
        return updated

    def _finish(self, req: Request) -> None:
        req.status = RequestStatus.FINISHED
        self.block_manager.free(req)
        del self.requests[req.request_id]

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage
