"""The engine host: the one native OS thread that owns MLX, and every model engine it runs.

Gunicorn's gevent worker monkey-patches `threading`, so a plain Thread would be a greenlet
and MLX work would block the event loop. The host thread is started with the original
`_thread.start_new_thread` and receives work through one C-level SimpleQueue (a real OS-thread
queue, unpatched) as (engine, message) pairs; results go back through one OutputBridge.

Its loop: drain the inbox; give every model with work one turn (admit, one step, one chunk of
prompt scoring), in a fixed order, so a busy small model cannot starve a big one; then load a
model that has requests waiting when the memory budget allows, evicting idle unpinned models
(least recently used) to make room. Every decision here is made from the host's own state
(counters, reservations, sizes), never from a clock, so the same loop can run on every rank
of a distributed group.
"""
from __future__ import annotations

import _queue
import gc
import logging
import time
import traceback
from typing import Optional

from gevent import monkey

from engine.bridge import OutputBridge
from engine.messages import AddGroup, AddRequest, Shutdown

log = logging.getLogger("orchard.engine")
_start_native_thread = monkey.get_original("_thread", "start_new_thread")
_IDLE_WAKE_S = 1.0  # idle heartbeat, so liveness checks see a beating loop


class EngineHost:
    # Set by the processes that run one host for their whole life (the Gunicorn worker:
    # app/worker.py; a follower rank: orchard/group.py), never in-process tests: see
    # _freeze_start_up. Class-wide because it must be known before the app builds its host.
    freeze_start_up = False

    def __init__(self, engines: list, memory_budget: Optional[int] = None, join_group=None):
        self.engines = list(engines)
        self._join_group = join_group  # () -> engine.distributed.StepGroup, for one model across ranks
        self.group = None
        self.stream = None  # in a group: the one stream every rank's model runs on
        self._unapplied: list = []  # taken from the inbox when the loop ended, never applied
        self.inbox = _queue.SimpleQueue()
        self.bridge: Optional[OutputBridge] = None
        self.memory_budget = memory_budget  # None until known: weights + KV + prefix caches of every model
        self.turns = 0  # turns given so far: the clock of least-recently-used eviction
        self.alive = False
        self.error: Optional[str] = None
        self.blas = "not loaded yet"
        for engine in self.engines:
            engine.attach(self)

    # ---- web side -------------------------------------------------------
    def start(self) -> None:
        """Start the host thread. Call from the thread that runs the gevent hub."""
        self.bridge = OutputBridge()
        for engine in self.engines:
            engine.preload()
        from engine import blas

        self.blas = blas.in_use()
        self._freeze_start_up()
        self.alive = True
        _start_native_thread(self._run, ())

    def post(self, engine, message) -> None:
        self.inbox.put((engine, message))

    def shutdown(self) -> None:
        self.inbox.put((None, Shutdown()))

    def run_follower(self) -> None:
        """A follower rank: no web side and no clients; the host loop runs on this thread,
        applying the leader's plans, until the leader shuts the group down or it is lost."""
        for engine in self.engines:
            engine.preload()
        self._freeze_start_up()
        self.alive = True
        self._run()
        if self.error is not None:
            raise RuntimeError(self.error)

    # ---- host thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open_all()
            while self._drain(block=not self._has_work()):
                for engine in self.engines:
                    if engine.loaded and engine.has_work:
                        self.turns += 1
                        engine.last_turn = self.turns
                        engine.turn()
                self._load_waiting()
                self._beat()
            for engine in self.engines:
                engine.stop()
            self._end_inbox("the server is shutting down")
        except BaseException as exc:
            self.error = f"engine loop died: {exc!r}"
            log.critical("%s\n%s", self.error, traceback.format_exc())
            for engine in self.engines:
                engine.die(self.error)
            self._end_inbox(self.error)
        finally:
            self.alive = False

    def _open_all(self) -> None:
        """Join the group (if any); every model's text side (tokenizer, limits); pinned models'
        weights too. Then the budget."""
        if self._join_group is not None:
            import mlx.core as mx

            self.group = self._join_group()  # blocks until every rank is there
            # One stream for everything with a collective in it (see engine/generator.py): a
            # stream of its own, like a single process's generator, made this thread's default
            # so that the prompt scorer and the embedder run on it too.
            self.stream = mx.new_stream(mx.default_device())
            mx.set_default_stream(self.stream)
        for engine in self.engines:
            engine.open(with_weights=engine.pinned)
        if self.memory_budget is None:  # auto: what is loaded now plus the KV share of what is left
            from engine import memory

            loaded = sum(e.weight_bytes for e in self.engines if e.loaded)
            self.memory_budget = loaded + memory.auto_budget(loaded)
        self._apply_mlx_limits()
        self.rebalance()
        if self.freeze_start_up:
            gc.freeze()  # the text sides and pinned weights: as long-lived (see _freeze_start_up)
        self._beat()

    def _apply_mlx_limits(self) -> None:
        from engine import memory

        memory.apply_mlx_limits(0, self.memory_budget)

    def _has_work(self) -> bool:
        return any(e.loaded and e.has_work for e in self.engines)

    def _drain(self, block: bool) -> bool:
        """Apply every queued message; False once Shutdown arrives. Blocking, it wakes at least
        once a second so the loop can retry a waiting load and liveness checks see it beat.
        In a group, the leader's messages are the plan every rank applies."""
        plan = self._collect(block) if self.group is None or self.group.is_leader else None
        if self.group is not None:
            self._unapplied = plan or []  # a lost group raises in share(): these still get their ends
            indexed = None if plan is None else [(self.engines.index(e) if e is not None else -1, m) for e, m in plan]
            plan = [(self.engines[i] if i >= 0 else None, m) for i, m in self.group.share(indexed, self.turns)]
            self._unapplied = []
        for position, (engine, message) in enumerate(plan):
            if isinstance(message, Shutdown):
                for e in self.engines:
                    e.fail_all("the server is shutting down", finish_reason="abort")
                self._unapplied = plan[position + 1:]
                return False
            try:
                engine.apply(message)
            except BaseException:
                self._unapplied = plan[position + 1:]  # ended by _end_inbox with the inbox's rest
                raise
        return True

    def _collect(self, block: bool) -> list:
        """The inbox's messages: waits up to a second for the first when `block`."""
        messages = []
        while True:
            try:
                item = self.inbox.get(timeout=_IDLE_WAKE_S) if block else self.inbox.get_nowait()
            except _queue.Empty:
                if block:
                    self._beat(sample=True)
                return messages
            messages.append(item)
            block = False
            if isinstance(item[1], Shutdown):
                return messages

    # ---- memory budget ---------------------------------------------------
    def used_bytes(self, without=None) -> int:
        """Weights of loaded (or loading) models plus KV reserved by running rows."""
        return sum(e.weight_bytes + e.reserved_bytes for e in self.engines if e.holds_memory and e is not without)

    def rebalance(self) -> None:
        """Each model's KV room is what the budget leaves after the weights and the other models'
        reservations; the prefix caches share what nobody has reserved. A model not loaded is
        offered what it could have once every unpinned model is idle and evicted: a request that
        fits that waits for its load (bounded by the web side), one that does not is refused at
        once. Runs when anything joins, finishes, loads or unloads, not on every step."""
        budget = self.memory_budget
        if budget is None:
            return
        holding = [e for e in self.engines if e.holds_memory]
        weights = sum(e.weight_bytes for e in holding)
        pinned = sum(e.weight_bytes for e in holding if e.pinned)
        reserved = sum(e.reserved_bytes for e in holding)
        for engine in self.engines:
            if engine.holds_memory:
                room = budget - weights - (reserved - engine.reserved_bytes)
            else:
                room = budget - pinned - engine.weight_bytes
            engine.set_kv_room(max(room, 0))
        free = max(budget - weights - reserved, 0)
        for engine in holding:
            engine.limit_prefix_cache(free // len(holding))

    def _load_waiting(self) -> None:
        """Load a model whose requests wait, if the budget allows once idle models are evicted."""
        for engine in self.engines:
            if engine.loaded or not engine.wants_weights:
                continue
            need = engine.weight_bytes + engine.first_reservation()
            idle = sorted((e for e in self.engines if e.loaded and e.evictable), key=lambda e: e.last_turn)
            free = self.memory_budget - self.used_bytes()
            if free + sum(e.weight_bytes for e in idle) < need:
                continue  # waits: running streams are never cut; the web side times the request out
            while free < need and idle:
                victim = idle.pop(0)
                log.info("evicting idle model %s to load %s", victim.model_id, engine.model_id)
                victim.unload()
                free = self.memory_budget - self.used_bytes()
            self._release()
            engine.load_weights()
            self.rebalance()
            self._beat(sample=True)  # MLX's memory counters are process-wide: every model's view

    def unloaded(self, engine) -> None:
        """An engine dropped its weights and caches: hand the memory back to the system."""
        self._release()
        self.rebalance()
        self._beat(sample=True)  # the memory it returned shows in status at once

    def _freeze_start_up(self) -> None:
        """Collect once, then move everything start-up made (imports, the app; at the end of
        _open_all the models' text sides and pinned weights) out of the garbage collector's
        reach (`gc.freeze`). A full collection holds the GIL for as long as it walks every
        object (0.06-0.14 s for a worker's 100,000-150,000 here: bench.loop_gaps), and one ran
        on this thread at every model load and unload while the event loop served (_release),
        besides Python's own occasional full collections on any thread. Frozen objects are still freed by reference counting;
        only a cycle among them never would be, and these live as long as the process. Runs
        before the host thread starts, so the one slow collection happens before serving."""
        if not self.freeze_start_up:
            return
        gc.collect()
        gc.freeze()
        log.info("%d start-up objects frozen: kept out of garbage collections", gc.get_freeze_count())

    @staticmethod
    def _release() -> None:
        import mlx.core as mx

        gc.collect()  # cycles that hold a dropped model's arrays; fast: start-up objects are frozen
        mx.clear_cache()

    def _beat(self, sample: bool = False) -> None:
        now = time.monotonic()  # measured only: liveness for the watchdog, no decision here
        for engine in self.engines:
            engine.stats.last_beat = now
            if sample:
                engine.sample_memory()

    def _end_inbox(self, why: str) -> None:
        """The loop has ended: every request still in the inbox (or taken from it and not yet
        applied) gets its end marker."""
        left, self._unapplied = list(self._unapplied), []
        while True:
            try:
                left.append(self.inbox.get_nowait())
            except _queue.Empty:
                break
        for engine, message in left:
            if isinstance(message, (AddRequest, AddGroup)) and engine is not None:
                engine.refuse(message, why)
