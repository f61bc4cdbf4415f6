"""Which requests run and which wait: every admission decision is made here.

Decisions depend only on the engine's own state (no clocks, no per-process
input), so the same sequence of inbox messages gives the same schedule on
every rank of a distributed group.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from engine.messages import AddRequest


@dataclass
class Sequence:
    """A request the engine has accepted, and what it has produced so far."""

    request: AddRequest
    uid: int = -1
    completion_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Scheduler:
    max_running: int
    waiting: collections.deque = field(default_factory=collections.deque)
    running: dict = field(default_factory=dict)  # uid -> Sequence

    def add(self, request: AddRequest) -> None:
        self.waiting.append(Sequence(request))

    def admissions(self) -> list[Sequence]:
        """Waiting sequences that may start now, oldest first."""
        free = self.max_running - len(self.running)
        admitted = []
        while free > 0 and self.waiting:
            admitted.append(self.waiting.popleft())
            free -= 1
        return admitted

    def start(self, sequence: Sequence, uid: int) -> None:
        sequence.uid = uid
        self.running[uid] = sequence

    def finish(self, uid: int) -> Sequence:
        return self.running.pop(uid)

    def find(self, request_id: str):
        """('waiting', seq) or ('running', seq) or (None, None)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                return "waiting", seq
        for seq in self.running.values():
            if seq.request_id == request_id:
                return "running", seq
        return None, None

    def drop_waiting(self, sequence: Sequence) -> None:
        self.waiting.remove(sequence)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
