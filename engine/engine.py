"""One model's engine: its batch, scheduler, prefix cache and prompt scorer.

Every model engine runs on the one engine host thread (engine/host.py), which owns MLX and
gives each model with work one turn per loop. The web side talks to an Engine through its
public methods (submit, abort, stats...), which only queue messages for the host thread.
A model's weights may be unloaded and loaded again (the host decides, within one memory
budget); its text side (tokenizer, limits, detokenizer table) stays, so requests for an
unloaded model are validated and queued like any other while it loads.
"""
from __future__ import annotations

import enum
import logging
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from gevent import monkey

from engine.bridge import RequestStream
from engine.messages import (AbortAll, AbortRequest, AddGroup, AddRequest, Admitted, Finished, InjectFault,
                             PromptLogprobs, TokenDelta, UnloadModel)
from engine.model import LoadedModel
from engine.scheduler import Scheduler, Sequence

log = logging.getLogger("orchard.engine")
_native_sleep = monkey.get_original("time", "sleep")  # the engine thread has no hub to yield to


AUTO_ADMISSION_WAIT = 8  # ADMISSION_WAIT_STEPS=auto with mlx-lm's BatchGenerator


class EngineState(str, enum.Enum):
    LOADING = "loading"  # the text side, or the weights, are being loaded
    READY = "ready"  # weights loaded: serving
    UNLOADED = "unloaded"  # text side only: requests queue and the host loads the weights
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
    decode_groups: int = 0  # width classes decoding in the last step (one forward pass each)
    decode_groups_max_seen: int = 0
    kv_cache_bytes: int = 0
    step_seconds: float = 0.0  # wall time inside generator steps (the rest is loop overhead or idle)
    prefill_seconds: float = 0.0  # of which mlx-lm processed prompts
    decode_seconds: float = 0.0  # of which mlx-lm decoded
    mlx_active_bytes: int = 0
    mlx_peak_bytes: int = 0
    mlx_cache_bytes: int = 0
    last_beat: float = 0.0
    loads: int = 0
    unloads: int = 0


class Engine:
    """One model. Web side: safe to call from request greenlets. Engine side: host thread only."""

    def __init__(self, loader: Callable[[bool], LoadedModel], *, max_running: int,
                 generator_factory: Callable[[LoadedModel, int], object],
                 preload: Optional[Callable[[], None]] = None, kv_budget: Optional[int] = None,
                 admission_group: int = 1, admission_wait_steps: Optional[int] = 0, model_id: str = "",
                 pinned: bool = True, weight_estimate: int = 0,
                 warm_up: Optional[Callable[[object, LoadedModel, int], None]] = None):
        self._loader = loader  # loader(with_weights, group, tokenizer=None) -> LoadedModel
        self._warm_up = warm_up  # (generator, model, max_running): compile shapes before READY
        self._preload = preload
        self._kv_budget_setting = kv_budget
        self._generator_factory = generator_factory
        self._host = None
        self._admission_wait = admission_wait_steps  # None: by the batching core (_start_serving)
        self._scheduler = Scheduler(max_running=max_running, group_size=admission_group,
                                    max_wait_steps=admission_wait_steps or 0)
        self._generator = None
        self._scorer = None  # engine.prompt_scorer.PromptScorer once the model is loaded
        self._to_score: list[AddRequest] = []  # prompt-logprob requests that arrived while unloaded
        self.model_id = model_id
        self.pinned = pinned
        self.weight_bytes = weight_estimate  # measured once loaded
        self.last_turn = 0  # the host's turn count when this model last had work (LRU eviction)
        self.model: Optional[LoadedModel] = None
        self.state = EngineState.LOADING
        self.error: Optional[str] = None
        self.stats = EngineStats()

    def attach(self, host) -> None:
        self._host = host

    # ---- web side -------------------------------------------------------
    def start(self) -> None:
        """A model served alone: start a host of its own (call from the gevent hub's thread)."""
        if self._host is None:
            from engine.host import EngineHost

            EngineHost([self], memory_budget=None)
        self._host.start()

    @property
    def blas(self) -> str:
        return self._host.blas if self._host is not None else "not loaded yet"

    @property
    def _bridge(self):
        return self._host.bridge

    def submit(self, request: AddRequest, ready=None) -> RequestStream:
        """Queue a request; `ready` (a gevent Event) may be shared by several streams."""
        return self.submit_group([request], ready)[0]

    def submit_group(self, requests: list[AddRequest], ready=None) -> list[RequestStream]:
        """Queue requests that belong together (one message: admitted together, one prefill)."""
        streams = [self._bridge.open(r.request_id, ready) for r in requests]
        self._host.post(self, requests[0] if len(requests) == 1 else AddGroup(tuple(requests)))
        if self.state in (EngineState.FAILED, EngineState.STOPPED) or not self._host.alive:
            # The loop is gone (it sets its state before it empties the inbox one last time),
            # so nothing would ever answer: end the requests here. A duplicate end is dropped.
            why = self.error or "the engine has stopped"
            self._bridge.post([(r.request_id, _gone(why)) for r in requests])
        return streams

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._host.post(self, AbortRequest(request_id, reason))

    def abort_all(self, reason: str = "abort") -> None:
        self._host.post(self, AbortAll(reason))

    def unload_if_idle(self) -> None:
        self._host.post(self, UnloadModel())

    def shutdown(self) -> None:
        self._host.shutdown()

    def inject_fault(self, kind: str) -> None:
        self._host.post(self, InjectFault(kind))

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
    def decode_core(self) -> Optional[str]:
        """Which batching core serves this model: 'slots' or 'mlx-lm' (None until loaded)."""
        if self._generator is None or not hasattr(self._generator, "slots"):
            return None
        return "slots" if self._generator.slots else "mlx-lm"

    @property
    def decode_attention(self) -> Optional[str]:
        """'kernel' (engine/slot_attention.py) or 'mask' (mlx-lm's masked attention); None until loaded."""
        if self._generator is None or not hasattr(self._generator, "fused_attention"):
            return None
        return "kernel" if self._generator.fused_attention else "mask"

    @property
    def cpu_math(self) -> Optional[bool]:
        """Whether the model's exp-heavy parts run through engine/cpu_math.py; None until loaded."""
        return getattr(self._generator, "cpu_math", None) if self._generator is not None else None

    @property
    def running(self) -> int:
        return len(self._scheduler.running)

    @property
    def max_running(self) -> int:
        return self._scheduler.max_running

    @property
    def waiting(self) -> int:
        queued = self._host.inbox.qsize() if self._host is not None and len(self._host.engines) == 1 else 0
        return len(self._scheduler.waiting) + (len(self._scorer) if self._scorer is not None else 0) + queued

    @property
    def text_ready(self) -> bool:
        """The tokenizer and limits are known: requests can be validated and queued."""
        return self.model is not None and self.state in (EngineState.READY, EngineState.UNLOADED, EngineState.LOADING)

    # ---- host thread: the host's view of this model -----------------------
    def preload(self) -> None:
        """Imports and model preparation, on the hub's thread before the host thread starts."""
        if self._preload is None:
            return
        try:
            self._preload()
        except Exception as exc:  # e.g. a missing model file: report it through /health
            self.error = f"model preparation failed: {exc}"
            self.state = EngineState.FAILED
            log.error(self.error)

    def open(self, with_weights: bool) -> None:
        """The text side always; the weights when asked (pinned models load at start)."""
        if self.state is EngineState.FAILED:
            return
        try:
            model = self._loader(with_weights, self._host.group)
            model.build_text_tables()
            self.model = model
            self._configure_kv(model)
            if with_weights:
                self._start_serving(model)
            else:
                self.state = EngineState.UNLOADED
                log.info("model %s ready to load on demand (%.1f MiB of weights)", self.model_id or model.model_id,
                         self.weight_bytes / 2**20)
        except BaseException as exc:  # a failed load must reach /health, not vanish
            self.error = f"model load failed: {exc}"
            self.state = EngineState.FAILED
            log.error("%s\n%s", self.error, traceback.format_exc())

    def _configure_kv(self, model: LoadedModel) -> None:
        from engine import memory

        if model.config.get("num_hidden_layers") or model.config.get("text_config"):
            self._scheduler.kv_bytes_per_token = memory.kv_bytes_per_token(
                model.config, memory.activation_bytes(model.dtype or _config_dtype(model.config)))
        if model.weight_bytes:
            self.weight_bytes = model.weight_bytes
        if self._kv_budget_setting is not None and self._host is not None and self._host.memory_budget is None \
                and len(self._host.engines) == 1 and model.weight_bytes:
            self._host.memory_budget = model.weight_bytes + self._kv_budget_setting  # KV_CACHE_BUDGET, one model

    def _start_serving(self, model: LoadedModel) -> None:
        self._generator = self._generator_factory(model, self._scheduler.max_running, self._host.stream)
        if self._admission_wait is None:
            # Gathering newcomers saves mlx-lm's BatchGenerator an extra forward pass per
            # admission; the slot batcher has none to save (a joining row rides the next decode
            # step), so there waiting would only delay first tokens (docs/benchmarks.md, stop 19).
            self._scheduler.max_wait_steps = 0 if getattr(self._generator, "slots", True) else AUTO_ADMISSION_WAIT
        if self._warm_up is not None:
            self._warm_up(self._generator, model, self._scheduler.max_running)
        if hasattr(self._generator, "keep_prefix"):  # a real model (not the synthetic generator)
            from engine.prompt_scorer import PromptScorer

            self._scorer = PromptScorer(model.model)
            for request in self._to_score:
                self._scorer.add(request)
        self._to_score.clear()
        self.sample_memory()
        self.state = EngineState.READY
        log.info("engine ready: %s", model.model_id)

    def load_weights(self) -> None:
        """Load this model's weights now (the host made room in the budget)."""
        self.state = EngineState.LOADING
        self.stats.last_beat = time.monotonic()
        try:
            loaded = self._loader(True, self._host.group, tokenizer=self.model.tokenizer)  # the weights alone
        except Exception as exc:  # its queued requests fail; the model stays loadable
            log.error("loading %s failed: %s", self.model_id, exc)
            self.state = EngineState.UNLOADED
            self.fail_all(f"loading the model failed: {exc}")
            return
        self.model.model, self.model.weight_bytes, self.model.dtype = loaded.model, loaded.weight_bytes, loaded.dtype
        self._configure_kv(self.model)
        self.stats.loads += 1
        self._start_serving(self.model)

    def unload(self) -> None:
        """Drop the weights, the batch and the prefix cache (the model must be idle)."""
        self._generator = None
        self._scorer = None
        self.model.model = None
        self.state = EngineState.UNLOADED
        self.stats.unloads += 1
        self.stats.kv_cache_bytes = 0
        self._host.unloaded(self)
        self.sample_memory()
        log.info("unloaded %s", self.model_id)

    @property
    def loaded(self) -> bool:
        return self.state is EngineState.READY

    @property
    def holds_memory(self) -> bool:
        return self.state in (EngineState.READY, EngineState.LOADING) and self.model is not None \
            and self.model.model is not None

    @property
    def has_work(self) -> bool:
        return self._scheduler.has_work or self._scoring

    @property
    def wants_weights(self) -> bool:
        return self.state is EngineState.UNLOADED and self.has_work

    @property
    def evictable(self) -> bool:
        return not self.pinned and not self.has_work

    @property
    def reserved_bytes(self) -> int:
        return self._scheduler.reserved_bytes

    def first_reservation(self) -> int:
        """KV bytes the oldest waiting request needs once this model loads."""
        waiting = self._scheduler.waiting
        return self._scheduler.batch_bytes(1, waiting[0].max_length) if waiting else 0

    def set_kv_room(self, room: int) -> None:
        self._scheduler.kv_budget = room

    def limit_prefix_cache(self, nbytes: int) -> None:
        if self._generator is not None and hasattr(self._generator, "limit_prefix_cache"):
            self._generator.limit_prefix_cache(nbytes)

    def turn(self) -> None:
        """One turn: admit what fits, one decode step, one chunk of prompt scoring."""
        self._admit()
        if self._scheduler.running:
            self._step()
        if self._scoring:
            self._score()

    def apply(self, message) -> None:
        if isinstance(message, AddRequest):
            self._accept(message)
        elif isinstance(message, AddGroup):
            for request in message.requests:
                self._accept(request)
        elif isinstance(message, AbortRequest):
            self._abort(message)
        elif isinstance(message, AbortAll):
            self.fail_all("the server is shutting down", finish_reason=message.reason)
        elif isinstance(message, UnloadModel):
            if self.loaded and self.evictable:
                self.unload()
        elif isinstance(message, InjectFault):
            self._inject(message.kind)

    def refuse(self, message, why: str) -> None:
        requests = message.requests if isinstance(message, AddGroup) else (message,)
        self._publish([(r.request_id, _gone(why)) for r in requests])

    def stop(self) -> None:
        self.state = EngineState.STOPPED

    def die(self, why: str) -> None:
        self.error = why
        self.state = EngineState.FAILED
        self.fail_all(why)

    @property
    def _scoring(self) -> bool:
        return bool(self._to_score or (self._scorer is not None and len(self._scorer)))

    def _accept(self, request: AddRequest) -> None:
        """Requests that want prompt log-probabilities are scored before they queue for a slot
        (held until the weights are loaded, when they are not)."""
        if request.prompt_logprobs is None:
            self._scheduler.add(request)
        elif self._scorer is not None:
            self._scorer.add(request)
        elif self.loaded:  # loaded, yet no scorer: the synthetic generator
            self._publish([(request.request_id, _gone("prompt logprobs need a real model"))])
        else:
            self._to_score.append(request)

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
        """Reservations changed (rows joined or finished): the host re-shares the budget."""
        self._host.rebalance()

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
        s.decode_groups = getattr(self._generator, "decode_groups", 1)
        s.decode_groups_max_seen = max(s.decode_groups_max_seen, s.decode_groups)
        s.prefill_seconds, s.decode_seconds = self._generator.phase_seconds
        if s.steps % 16 == 0:  # sizes walk every layer's cache: not on every step
            s.kv_cache_bytes = self._generator.kv_cache_bytes
            self.sample_memory()

    def sample_memory(self) -> None:
        import mlx.core as mx  # engine thread: the only MLX caller

        s = self.stats
        s.mlx_active_bytes, s.mlx_peak_bytes = mx.get_active_memory(), mx.get_peak_memory()
        s.mlx_cache_bytes = mx.get_cache_memory()

    def _abort(self, message: AbortRequest) -> None:
        held = next((r for r in self._to_score if r.request_id == message.request_id), None)
        if held is not None:
            self._to_score.remove(held)
            self._publish([(held.request_id, Finished(message.reason, len(held.prompt_tokens), 0))])
            return
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
            if kind == "stall":  # like a kernel that never returns; the watchdog ends the worker
                _native_sleep(3600)
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
        self._generator = self._generator_factory(self.model, self._scheduler.max_running, self._host.stream)
        self._publish(failed)

    def fail_all(self, why: str, finish_reason: str = "error") -> None:
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
        held = self._to_score + (self._scorer.drain() if self._scorer is not None else [])
        self._to_score = []
        ended += [(r.request_id, Finished(finish_reason, len(r.prompt_tokens), 0, error=why)) for r in held]
        if ended and self._bridge is not None:
            self._publish(ended)

    def _publish(self, items: list) -> None:
        if items and self._host.bridge is not None:  # a follower rank has no clients to tell
            self._bridge.post(items)


def _config_dtype(config: dict) -> str:
    """The weights' dtype as config.json names it (before they are loaded)."""
    text = config.get("text_config", config)
    return str(text.get("torch_dtype") or config.get("torch_dtype") or "float32")


def _gone(why: str) -> Finished:
    return Finished("error", error=why)


def _error(exc: Exception) -> Finished:
    return _gone(str(exc) or exc.__class__.__name__)
