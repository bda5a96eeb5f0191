"""Which data-parallel rank a new request goes to: the lowest score of (waiting x WAITING_WEIGHT + running),
as vLLM scores them. The DP coordinator publishes every rank's counts (`LoadSnapshot`); between two snapshots
this front end adds what it sent, so a burst spreads over the ranks instead of piling on the one that looked
idlest at the last snapshot."""
from __future__ import annotations

from typing import Protocol, TypeVar

from elastic.protocol.from_coordinator import LoadSnapshot

WAITING_WEIGHT = 4  # a waiting request costs more than a running one (vLLM's routing score)


class _Ranked(Protocol):
    rank: int


E = TypeVar("E", bound=_Ranked)


class LoadBalancer:
    def __init__(self, num_ranks: int) -> None:
        self.counts: list[list[int]] = [[0, 0] for _ in range(num_ranks)]  # by rank: (waiting, running)

    def reset(self, num_ranks: int) -> None:
        """The ranks changed (a scale, a recovery): unknown until the next snapshot."""
        self.counts = [[0, 0] for _ in range(num_ranks)]

    def on_snapshot(self, snapshot: LoadSnapshot, epoch: int) -> None:
        """Replaces what was added since the last one: the engines now count those requests themselves."""
        if snapshot.epoch == epoch and len(snapshot.counts) == len(self.counts):
            self.counts = [list(c) for c in snapshot.counts]

    def sent(self, rank: int, num_requests: int) -> None:
        if 0 <= rank < len(self.counts):  # waiting there until the next snapshot says otherwise
            self.counts[rank][0] += num_requests

    def pick(self, live: list[E]) -> E:
        """The lowest score; ties go to the lowest rank."""
        counts = self.counts
        return min(live, key=lambda e: (counts[e.rank][0] * WAITING_WEIGHT + counts[e.rank][1], e.rank))
