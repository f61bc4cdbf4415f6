"""The engine: one native OS thread that owns MLX, the model and the batch.

Gunicorn's gevent worker monkey-patches `threading`, so a plain Thread would be
a greenlet and MLX work would block the event loop. The engine thread is started
with the original `_thread.start_new_thread`, receives work through a C-level
SimpleQueue (a real OS-thread queue, unpatched), and sends results back through
the OutputBridge. Its loop: drain the inbox, admit, step once, publish; it
blocks only when there is no work.
"""
from __future__ import annotations

import _queue
import enum
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from gevent import monkey

from engine.bridge import OutputBridge, RequestStream
from engine.messages import (AbortAll, AbortRequest, AddGroup, AddRequest, Admitted, Finished, InjectFault,
                             PromptLogprobs, Shutdown, TokenDelta)
from engine.model import LoadedModel
from engine.scheduler import Scheduler, Sequence

log = logging.getLogger("orchard.engine")
_start_native_thread = monkey.get_original("_thread", "start_new_thread")
_IDLE_WAKE_S = 1.0  # idle heartbeat, so liveness checks see a beating loop


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class EngineStats:
    """Counters written by the engine thread only; readers see plain ints."""

    steps: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the prefix cache
    generated_tokens: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    max_batch_seen: int = 0
    current_batch: int = 0
    kv_cache_bytes: int = 0
    step_seconds: float = 0.0  # wall time inside generator steps (the rest is loop overhead or idle)
    prefill_seconds: float = 0.0  # of which mlx-lm processed prompts
    decode_seconds: float = 0.0  # of which mlx-lm decoded
    mlx_active_bytes: int = 0
    mlx_peak_bytes: int = 0
    mlx_cache_bytes: int = 0
    last_beat: float = 0.0


class Engine:
    """Public face used by the web layer; safe to call from request greenlets."""

    def __init__(self, loader: Callable[[], LoadedModel], *, max_running: int,
                 generator_factory: Callable[[LoadedModel, int], object],
                 preload: Optional[Callable[[], None]] = None, kv_budget: Optional[int] = None,
                 admission_group: int = 1, admission_wait_steps: int = 0):
        self._loader = loader
        self._preload = preload
        self._kv_budget_setting = kv_budget
        self._generator_factory = generator_factory
        self._inbox = _queue.SimpleQueue()
        self._scheduler = Scheduler(max_running=max_running, group_size=admission_group,
                                    max_wait_steps=admission_wait_steps)
        self._bridge: Optional[OutputBridge] = None
        self._generator = None
        self._scorer = None  # engine.prompt_scorer.PromptScorer once the model is loaded
        self.model: Optional[LoadedModel] = None
        self.state = EngineState.LOADING
        self.error: Optional[str] = None
        self.blas = "not loaded yet"
        self.stats = EngineStats()

    # ---- web side -------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread. Call from the thread that runs the gevent hub."""
        self._bridge = OutputBridge()
        if self._preload is not None:
            # Import MLX and mlx-lm here, not on the engine thread: some imports spawn
            # subprocesses, and gevent's patched subprocess only works on the main loop.
            try:
                self._preload()
            except Exception as exc:  # e.g. a missing model file: report it through /health
                self.error = f"model preparation failed: {exc}"
                self.state = EngineState.FAILED
                log.error(self.error)
                return
        _start_native_thread(self._run, ())

    def submit(self, request: AddRequest, ready=None) -> RequestStream:
        """Queue a request; `ready` (a gevent Event) may be shared by several streams."""
        return self.submit_group([request], ready)[0]

    def submit_group(self, requests: list[AddRequest], ready=None) -> list[RequestStream]:
        """Queue requests that belong together (one message: admitted together, one prefill)."""
        streams = [self._bridge.open(r.request_id, ready) for r in requests]
        self._inbox.put(requests[0] if len(requests) == 1 else AddGroup(tuple(requests)))
        if self.state in (EngineState.FAILED, EngineState.STOPPED):
            # The loop is gone (it sets its state before it empties the inbox one last time),
            # so nothing would ever answer: end the requests here. A duplicate end is dropped.
            why = self.error or "the engine has stopped"
            self._bridge.post([(r.request_id, _gone(why)) for r in requests])
        return streams

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._inbox.put(AbortRequest(request_id, reason))

    def abort_all(self, reason: str = "abort") -> None:
        self._inbox.put(AbortAll(reason))

    def shutdown(self) -> None:
        self._inbox.put(Shutdown())

    def inject_fault(self, kind: str) -> None:
        self._inbox.put(InjectFault(kind))

    @property
    def kv_budget(self) -> Optional[int]:
        return self._scheduler.kv_budget

    @property
    def kv_reserved(self) -> int:
        return self._scheduler.reserved_bytes

    def fits_alone(self, max_length: int) -> bool:
        return self._scheduler.fits_alone(max_length)

    def longest_alone(self) -> Optional[int]:
        return self._scheduler.longest_alone()

    def prefix_cache(self) -> dict:
        """A snapshot of the prefix cache (plain ints written by the engine thread)."""
        cache = getattr(self._generator, "prefix_cache", None)
        if cache is None:
            return {"enabled": False, "entries": 0, "bytes": 0}
        st = cache.stats
        return {"enabled": cache.capacity > 0, "entries": len(cache), "bytes": cache.nbytes,
                "hits": st.hits, "misses": st.misses, "hit_tokens": st.hit_tokens, "evicted": st.evicted}

    @property
    def running(self) -> int:
        return len(self._scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self._scheduler.waiting) + self._inbox.qsize()

    # ---- engine thread ----------------------------------------------------
    def _run(self) -> None:
        try:
            model = self._loader()
            model.build_text_tables()
            self.model = model
            self._configure_memory()
            self._generator = self._generator_factory(self.model, self._scheduler.max_running)
            if hasattr(self._generator, "keep_prefix"):  # a real model (not the synthetic generator)
                from engine.prompt_scorer import PromptScorer

                self._scorer = PromptScorer(self.model.model)
            self._sample_memory()
            self.state = EngineState.READY
            log.info("engine ready: %s", self.model.model_id)
        except BaseException as exc:  # a failed load must reach /health, not vanish
            self.error = f"model load failed: {exc}"
            self.state = EngineState.FAILED
            log.error("%s\n%s", self.error, traceback.format_exc())
            return
        try:
            while self._drain_inbox(block=not (self._scheduler.has_work or self._scoring)):
                self._admit()
                if self._scheduler.running:
                    self._step()
                if self._scoring:
                    self._score()
            self.state = EngineState.STOPPED
            self._end_inbox("the server is shutting down")
        except BaseException as exc:
            self.error = f"engine loop died: {exc!r}"
            self.state = EngineState.FAILED
            log.critical("%s\n%s", self.error, traceback.format_exc())
            self._fail_all(self.error)
            self._end_inbox(self.error)

    def _configure_memory(self) -> None:
        from engine import memory

        self._scheduler.kv_bytes_per_token = memory.kv_bytes_per_token(
            self.model.config, memory.activation_bytes(self.model.dtype))
        budget = self._kv_budget_setting or memory.auto_budget(self.model.weight_bytes)
        memory.apply_mlx_limits(self.model.weight_bytes, budget)
        self._scheduler.kv_budget = budget

    def _drain_inbox(self, block: bool) -> bool:
        """Apply every queued message; False once Shutdown arrives."""
        while True:
            try:
                message = self._inbox.get(timeout=_IDLE_WAKE_S) if block else self._inbox.get_nowait()
            except _queue.Empty:
                if not block:  # the usual case between steps: nothing to do here
                    return True
                self.stats.last_beat = time.monotonic()  # idle heartbeat
                self._sample_memory()
                continue
            block = False
            if isinstance(message, AddRequest):
                self._accept(message)
            elif isinstance(message, AddGroup):
                for request in message.requests:
                    self._accept(request)
            elif isinstance(message, AbortRequest):
                self._abort(message)
            elif isinstance(message, AbortAll):
                self._fail_all("the server is shutting down", finish_reason=message.reason)
            elif isinstance(message, Shutdown):
                self._fail_all("the server is shutting down", finish_reason="abort")
                return False
            elif isinstance(message, InjectFault):
                self._inject(message.kind)

    @property
    def _scoring(self) -> bool:
        return bool(self._scorer is not None and len(self._scorer))

    def _accept(self, request: AddRequest) -> None:
        """Requests that want prompt log-probabilities are scored before they queue for a slot."""
        if request.prompt_logprobs is None:
            self._scheduler.add(request)
        elif self._scorer is None:
            self._publish([(request.request_id, _gone("prompt logprobs need a real model"))])
        else:
            self._scorer.add(request)

    def _score(self) -> None:
        """One chunk of prompt scoring per loop iteration, beside the batch's step."""
        self.stats.last_beat = time.monotonic()
        head = self._scorer.head  # the request this chunk belongs to
        try:
            result = self._scorer.step()
        except Exception as exc:  # a bad prompt fails alone
            self._scorer.remove(head.request_id)
            self._publish([(head.request_id, _error(exc))])
            return
        job, finished = result
        if not finished:
            return
        request = job.request
        self._generator.keep_prefix(request.prompt_tokens, job.cache, request.cache_scope)
        out = [(request.request_id, PromptLogprobs(job.entries))]
        if request.max_tokens == 0:  # echo only: the prompt was the answer
            self.stats.requests_finished += 1
            out.append((request.request_id, Finished("length", len(request.prompt_tokens), 0)))
        else:
            self._scheduler.add(request)
        self._publish(out)

    def _admit(self) -> None:
        admitted = []
        sequences = self._scheduler.admissions()
        if not sequences:
            return
        results = self._generator.insert_many([s.request for s in sequences])
        for sequence, result in zip(sequences, results):
            if isinstance(result, Exception):  # a bad request fails alone
                admitted.append((sequence.request_id, _error(result)))
                continue
            uid, cached = result
            self._scheduler.start(sequence, uid)
            sequence.cached_tokens = cached
            self.stats.prompt_tokens += len(sequence.request.prompt_tokens)
            self.stats.cached_prompt_tokens += cached
            admitted.append((sequence.request_id, Admitted(cached)))
        self._publish(admitted)
        if admitted:
            self._fit_prefix_cache()

    def _fit_prefix_cache(self) -> None:
        """The prefix cache lives in what running rows' reservations leave of the KV budget; both
        change only when sequences join or finish, so this runs then, not on every step."""
        if self._scheduler.kv_budget is not None:
            self._generator.limit_prefix_cache(self._scheduler.kv_budget - self._scheduler.reserved_bytes)

    def _step(self) -> None:
        started = time.perf_counter()  # measured only: no decision depends on it
        try:
            tokens = self._generator.step()
            self.stats.step_seconds += time.perf_counter() - started
        except Exception as exc:
            log.error("engine step failed: %s\n%s", exc, traceback.format_exc())
            self._fail_running(exc)
            return
        deltas: dict[str, TokenDelta] = {}
        finished = []
        for t in tokens:
            sequence = self._scheduler.running[t.uid]
            sequence.completion_tokens += 1
            if t.finish_reason != "stop":  # the stop token itself is not text
                delta = deltas.get(sequence.request_id)
                if delta is None:
                    delta = deltas[sequence.request_id] = TokenDelta([], [] if t.logprob is not None else None)
                delta.token_ids.append(t.token)
                if t.logprob is not None:
                    delta.logprobs.append(t.logprob)
            if t.finish_reason is not None:
                self._scheduler.finish(t.uid)
                finished.append((sequence.request_id, self._finished(sequence, t.finish_reason)))
        self._scheduler.tick()
        if finished:  # they left their state in the prefix cache and freed their reservations
            self._fit_prefix_cache()
        self._record_step(len(tokens))
        self._publish(list(deltas.items()) + finished)

    def _record_step(self, n_tokens: int) -> None:
        s = self.stats
        s.steps += 1
        s.generated_tokens += n_tokens
        s.current_batch = n_tokens
        s.max_batch_seen = max(s.max_batch_seen, n_tokens)
        s.last_beat = time.monotonic()
        s.prefill_seconds, s.decode_seconds = self._generator.phase_seconds
        if s.steps % 16 == 0:  # sizes walk every layer's cache: not on every step
            s.kv_cache_bytes = self._generator.kv_cache_bytes
            self._sample_memory()

    def _sample_memory(self) -> None:
        import mlx.core as mx  # engine thread: the only MLX caller

        s = self.stats
        s.mlx_active_bytes, s.mlx_peak_bytes = mx.get_active_memory(), mx.get_peak_memory()
        s.mlx_cache_bytes = mx.get_cache_memory()

    def _abort(self, message: AbortRequest) -> None:
        if self._scorer is not None:
            scored = self._scorer.remove(message.request_id)
            if scored is not None:
                self._publish([(scored.request_id, Finished(message.reason, len(scored.prompt_tokens), 0))])
                return
        where, sequence = self._scheduler.find(message.request_id)
        if where == "waiting":
            self._scheduler.drop_waiting(sequence)
        elif where == "running":
            # Aborts come from the web layer: a stop string matched or the client left. Once it
            # has generated, its state (prompt and answer so far) is worth a prefix-cache entry.
            self._generator.remove(sequence.uid, keep_prefix=sequence.completion_tokens > 0)
            self._scheduler.finish(sequence.uid)
            self._fit_prefix_cache()
        else:
            return
        self._publish([(sequence.request_id, self._finished(sequence, message.reason))])

    def _inject(self, kind: str) -> None:
        if kind == "loop":
            raise RuntimeError("injected engine-loop fault")
        real_step = self._generator.step

        def failing_step():
            self._generator.step = real_step
            raise RuntimeError("injected step fault")

        self._generator.step = failing_step

    def _finished(self, sequence: Sequence, reason: str) -> Finished:
        self.stats.requests_finished += 1
        return Finished(reason, len(sequence.request.prompt_tokens), sequence.completion_tokens,
                        cached_tokens=sequence.cached_tokens)

    def _fail_running(self, exc: Exception) -> None:
        """A failed step touched every running row: fail those, keep serving the rest."""
        failed = [(seq.request_id, _error(exc)) for seq in self._scheduler.running.values()]
        self._scheduler.running.clear()
        self.stats.requests_failed += len(failed)
        self._generator = self._generator_factory(self.model, self._scheduler.max_running)
        self._publish(failed)

    def _fail_all(self, why: str, finish_reason: str = "error") -> None:
        sequences = list(self._scheduler.running.values()) + list(self._scheduler.waiting)
        if self._generator is not None:
            for uid in list(self._scheduler.running):
                try:
                    self._generator.remove(uid)
                except Exception:  # the batch may be broken already; the requests end regardless
                    log.exception("could not remove sequence %s", uid)
        self._scheduler.running.clear()
        self._scheduler.waiting.clear()
        ended = [(s.request_id, Finished(finish_reason, len(s.request.prompt_tokens), s.completion_tokens,
                                         error=why)) for s in sequences]
        if self._scorer is not None:
            ended += [(r.request_id, Finished(finish_reason, len(r.prompt_tokens), 0, error=why))
                      for r in self._scorer.drain()]
        if ended and self._bridge is not None:
            self._publish(ended)

    def _end_inbox(self, why: str) -> None:
        """The loop has ended: every request still in the inbox gets its end marker."""
        ended = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except _queue.Empty:
                break
            if isinstance(message, AddRequest):
                ended.append((message.request_id, _gone(why)))
            elif isinstance(message, AddGroup):
                ended += [(r.request_id, _gone(why)) for r in message.requests]
        self._publish(ended)

    def _publish(self, items: list) -> None:
        if items:
            self._bridge.post(items)


def _gone(why: str) -> Finished:
    return Finished("error", error=why)


def _error(exc: Exception) -> Finished:
    return _gone(str(exc) or exc.__class__.__name__)
