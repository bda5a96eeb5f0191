"""The scaling state machine: one operation at a time, identified by an operation id.

    idle --begin--> preparing --> committing --> idle (result: succeeded)
                        |             |
                        +-------------+--> rolling_back --> idle (result: rolled_back)
    (a failure past the point of no return ends as `failed`; the state is idle again either way)

The same operation id again is the same operation: while it runs the caller joins it, afterwards it gets
the recorded outcome (so an autoscaler may retry blindly). A different operation while one runs is a
conflict (409). `finish` always returns the machine to idle: nothing can leave it stuck "scaling".
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

IDLE, PREPARING, COMMITTING, ROLLING_BACK = "idle", "preparing", "committing", "rolling_back"
SUCCEEDED, ROLLED_BACK, FAILED, NOOP = "succeeded", "rolled_back", "failed", "noop"
_HISTORY = 64  # finished operations remembered for idempotent retries


class ScaleError(Exception):
    """A scale request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ScaleOperation:
    operation_id: str
    source: int
    target: int
    drain_timeout: float
    started_at: float = field(default_factory=time.time)  # wall clock, for the status API
    started: float = field(default_factory=time.monotonic)
    state: str = PREPARING
    result: str | None = None
    error: str | None = None
    prepare_s: float = 0.0
    blocking_s: float = 0.0
    total_s: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def direction(self) -> str:
        return "up" if self.target > self.source else "down" if self.target < self.source else "none"

    def summary(self) -> dict[str, Any]:
        out = {"operation_id": self.operation_id, "result": self.result, "from": self.source, "to": self.target,
               "direction": self.direction, "prepare_s": round(self.prepare_s, 4),
               "blocking_s": round(self.blocking_s, 4), "total_s": round(self.total_s, 4)}
        if self.error:
            out["error"] = self.error
        return out


class ScaleTracker:
    def __init__(self, size: int) -> None:
        self.size = size
        self.current: ScaleOperation | None = None
        self.last: ScaleOperation | None = None
        self.history: OrderedDict[str, ScaleOperation] = OrderedDict()

    @property
    def state(self) -> str:
        return self.current.state if self.current is not None else IDLE

    def begin(self, target: int, drain_timeout: float, operation_id: str | None) -> tuple[ScaleOperation, bool]:
        """(the operation, whether it is new and must be run). Raises ScaleError(409) on a conflict."""
        if operation_id is not None:
            if self.current is not None and self.current.operation_id == operation_id:
                self._check_same(self.current, target)
                return self.current, False
            if operation_id in self.history:
                self._check_same(self.history[operation_id], target)
                return self.history[operation_id], False
        if self.current is not None:
            raise ScaleError(409, f"operation {self.current.operation_id} ({self.current.source} -> "
                                  f"{self.current.target} ranks) is {self.current.state}; retry when it is done")
        op = ScaleOperation(operation_id or uuid.uuid4().hex[:12], self.size, target, drain_timeout)
        self.current = op
        return op, True

    @staticmethod
    def _check_same(op: ScaleOperation, target: int) -> None:
        if op.target != target:
            raise ScaleError(409, f"operation id {op.operation_id} was used for a scale to {op.target} ranks")

    def enter(self, op: ScaleOperation, state: str) -> None:
        if op is self.current:
            op.state = state

    def finish(self, op: ScaleOperation, result: str, size: int, error: str | None = None) -> None:
        op.result, op.error, op.state = result, error, IDLE
        op.total_s = time.monotonic() - op.started
        self.size = size
        if op is self.current:
            self.current = None
        self.last = op
        self.history[op.operation_id] = op
        while len(self.history) > _HISTORY:
            self.history.popitem(last=False)
        op.done.set()

    def status(self) -> dict[str, Any]:
        op = self.current
        last = self.last
        return {"state": self.state, "data_parallel_size": self.size,
                "target": op.target if op is not None else None,
                "operation_id": op.operation_id if op is not None else None,
                "started_at": op.started_at if op is not None else None,
                "last": None if last is None else {"result": last.result, "prepare_s": round(last.prepare_s, 4),
                                                   "blocking_s": round(last.blocking_s, 4),
                                                   "total_s": round(last.total_s, 4),
                                                   "operation_id": last.operation_id, "from": last.source,
                                                   "to": last.target, "error": last.error}}
