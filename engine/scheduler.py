"""Which requests run and which wait: every admission decision is made here.

Decisions depend only on the engine's own state (no clocks, no per-process
input), so the same sequence of inbox messages gives the same schedule on
every rank of a distributed group.

Memory: mlx-lm's batch KV cache pads every row to the longest one and grows in
steps of 256 tokens, so the worst case of a batch is
rows x round_up(max(prompt + max_tokens)) x bytes per token. A sequence joins
only if that worst case stays within the KV budget; otherwise it waits.

Grouping: every admission costs the running batch one extra forward pass (mlx-lm
runs new rows' first step on its own, then concatenates them into the batch), about
the price of a whole decode step. Under steady load, arrivals trickle in one or two
per step, so admitting each at once would nearly double the passes. While a batch is
running, newcomers therefore wait until a group has gathered (a quarter of the running
rows, at most the prefill batch, at most the free slots) or the oldest has waited
`max_wait_steps` steps, whichever comes first; an idle engine admits at once. This is
text-generation-inference's `max_waiting_tokens` idea, counted in engine steps, not in
time, so it stays deterministic.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

from engine.messages import AddRequest

KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens


def round_up(tokens: int) -> int:
    return -(-tokens // KV_STEP) * KV_STEP


@dataclass
class Sequence:
    """A request the engine has accepted, and what it has produced so far."""

    request: AddRequest
    uid: int = -1
    queued_at_step: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def max_length(self) -> int:
        return len(self.request.prompt_tokens) + self.request.max_tokens


@dataclass
class Scheduler:
    max_running: int
    kv_bytes_per_token: int = 0
    kv_budget: Optional[int] = None  # None: unbounded
    group_size: int = 1  # the most newcomers worth gathering (the prefill batch size)
    max_wait_steps: int = 0  # 0: admit as soon as there is room
    steps: int = 0
    waiting: collections.deque = field(default_factory=collections.deque)
    running: dict = field(default_factory=dict)  # uid -> Sequence

    def add(self, request: AddRequest) -> None:
        self.waiting.append(Sequence(request, queued_at_step=self.steps))

    def tick(self) -> None:
        """One engine step happened."""
        self.steps += 1

    def group_ready(self) -> bool:
        if not self.running or not self.max_wait_steps:
            return True
        free = self.max_running - len(self.running)
        target = max(1, min(self.group_size, free, len(self.running) // 4))
        return len(self.waiting) >= target or self.steps - self.waiting[0].queued_at_step >= self.max_wait_steps

    def batch_bytes(self, rows: int, longest: int) -> int:
        return rows * round_up(longest) * self.kv_bytes_per_token

    def longest_alone(self) -> Optional[int]:
        """The most tokens (prompt + completion) one sequence may hold within the KV budget."""
        if self.kv_budget is None or not self.kv_bytes_per_token:
            return None
        return self.kv_budget // (KV_STEP * self.kv_bytes_per_token) * KV_STEP

    def fits_alone(self, max_length: int) -> bool:
        return self.kv_budget is None or self.batch_bytes(1, max_length) <= self.kv_budget

    @property
    def reserved_bytes(self) -> int:
        longest = max((s.max_length for s in self.running.values()), default=0)
        return self.batch_bytes(len(self.running), longest)

    def admissions(self) -> list[Sequence]:
        """Waiting sequences that may start now, oldest first (no overtaking)."""
        admitted = []
        if not self.waiting or not self.group_ready():
            return admitted
        rows = len(self.running)
        longest = max((s.max_length for s in self.running.values()), default=0)
        while self.waiting and rows < self.max_running:
            head = self.waiting[0]
            candidate = max(longest, head.max_length)
            if self.kv_budget is not None and rows and self.batch_bytes(rows + 1, candidate) > self.kv_budget:
                break  # hold: it fits once running sequences finish
            admitted.append(self.waiting.popleft())
            rows, longest = rows + 1, candidate
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
