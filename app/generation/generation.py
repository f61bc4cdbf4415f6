"""A Generation follows one API request through the engine: it submits one engine request per
choice, fans their outputs in, and yields typed events (text, tool-call pieces, logprobs, the
end of each choice). Runs on the request's greenlet; every API's serving edge consumes it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

from gevent.event import Event as GeventEvent

from app import disconnect
from app.errors import overloaded
from app.generation.events import (ChoiceDone, Event, FinishReason, LogprobEntry, PromptScored, TextDelta,
                                   ToolCallEvent, TopLogprob)
from app.generation.request import GenerationRequest
from app.metrics import Metrics
from app.output import TextAssembler
from app.request_log import log_completion
from engine.detokenizer import Detokenizer
from engine.engine import Engine
from engine.messages import AddRequest, Admitted, Finished, PromptLogprobs, TokenDelta, TokenLogprob

KEEPALIVE_S = 5.0
_ENGINE_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


@dataclass
class GenerationContext:
    """What a Generation needs from the server: built once per served model."""

    engine: Engine
    text: object  # app.model_text.ModelText
    metrics: Metrics
    queue_timeout: float


class Choice:
    """One choice's text path: token ids -> text (stop strings) -> tool calls, and its logprobs."""

    def __init__(self, index: int, ctx: GenerationContext, request: GenerationRequest):
        self.index = index
        self._text = ctx.text
        self.assembler = TextAssembler(Detokenizer(ctx.text.hf_tokenizer, ctx.text.table), list(request.stop_strings))
        self.parser = request.tool_parser(request.parallel_tool_calls) if request.tool_parser else None
        self.timer = ctx.metrics.timer()
        self.done: Optional[ChoiceDone] = None

    def tokens(self, delta: TokenDelta) -> list[Event]:
        self.timer.tokens(len(delta.token_ids))
        text = self.assembler.add(delta.token_ids)
        logprobs = self._logprobs(delta) if delta.logprobs is not None else []
        return self._text_events(text, logprobs)

    def finish(self, finished: Finished) -> list[Event]:
        events: list[Event] = []
        if finished.finish_reason != "error":
            events = self._text_events(self.assembler.finish(), [], final=True)
        reason = _ENGINE_REASONS.get(finished.finish_reason, FinishReason.ERROR)
        calls = self.parser.calls if self.parser else []
        if calls and reason is FinishReason.STOP:
            reason = FinishReason.TOOL_CALLS
        self.done = ChoiceDone(self.index, reason, finished.completion_tokens, calls, finished.error)
        return events + [self.done]

    def _text_events(self, text: str, logprobs: list[LogprobEntry], final: bool = False) -> list[Event]:
        if self.parser is None:
            return [TextDelta(self.index, text, logprobs)] if text or logprobs else []
        content, calls = self.parser.feed(text) if text else ("", [])
        if final:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        events: list[Event] = [TextDelta(self.index, content, logprobs)] if content or logprobs else []
        return events + [ToolCallEvent(self.index, call) for call in calls]

    def _logprobs(self, delta: TokenDelta) -> list[LogprobEntry]:
        return [self.entry(token, lp) for token, lp in zip(delta.token_ids, delta.logprobs)]

    def entry(self, token: int, lp: TokenLogprob) -> LogprobEntry:
        data = self._text.token_bytes(token)
        return LogprobEntry(data.decode("utf-8", "replace"), list(data), lp.logprob, _top(lp, self._text.token_bytes))

    def scored(self, prompt: list[int], message: PromptLogprobs) -> PromptScored:
        """The first token has no logprob (nothing precedes it): logprob None, no alternatives."""
        return PromptScored(self.index, [self.entry(token, lp or TokenLogprob(None))
                                         for token, lp in zip(prompt, message.entries)])


def _top(lp: TokenLogprob, piece) -> list[TopLogprob]:
    return [TopLogprob((data := piece(t)).decode("utf-8", "replace"), list(data), value) for t, value in lp.top]


class Generation:
    """One API request in flight: its n engine streams, their text, their timings."""

    def __init__(self, ctx: GenerationContext, request: GenerationRequest, environ: dict):
        self.request = request
        self._ctx = ctx
        self._ready = GeventEvent()
        self.admitted = False
        self.cached_tokens = 0  # prompt tokens the engine's prefix cache supplied (first choice)
        self.choices = [Choice(i, ctx, request) for i in range(request.choices)]
        self._arrived = time.perf_counter()
        self._streams = ctx.engine.submit_group([self._engine_request(i) for i in range(request.choices)],
                                                self._ready)
        self._watcher = disconnect.watch(environ, self.abort)
        self._closed = False

    def _engine_request(self, index: int) -> AddRequest:
        r = self.request
        sampling = r.sampling if index % r.n == 0 else r.sampling.with_seed(r.choice_seed(index))
        scored = r.prompt_logprobs if index % r.n == 0 else None  # once per prompt; the serving copies it
        return AddRequest(f"{r.id}/{index}", r.prompt_of(index), r.max_tokens, sampling, ignore_eos=r.ignore_eos,
                          cache_scope=r.cache_scope, logprobs=r.logprobs, grammar=r.grammar,
                          prompt_logprobs=scored)

    @property
    def finished(self) -> bool:
        return all(c.done is not None for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.done.completion_tokens for c in self.choices if c.done is not None)

    def events(self) -> Iterator[Optional[Event]]:
        """Events until every choice is done; None when nothing came for a while (a keep-alive
        moment). Raises APIError(503) if the request waited in the queue too long."""
        try:
            while not self.finished:
                if not any(s.has_pending for s in self._streams):
                    self._ready.wait(self._wait_s())
                self._ready.clear()
                batch = [(c, m) for c, s in zip(self.choices, self._streams) for m in s.take()]
                if not batch:
                    self._check_queue_timeout()
                    yield None
                    continue
                for choice, message in batch:
                    yield from self._handle(choice, message)
        finally:
            self.close()

    def _handle(self, choice: Choice, message) -> Iterator[Event]:
        if choice.done is not None:
            return
        if isinstance(message, TokenDelta):
            yield from choice.tokens(message)
            if choice.assembler.stopped:  # a stop string: end this choice now; the engine is told
                self._ctx.engine.abort(f"{self.request.id}/{choice.index}")
                yield from choice.finish(Finished("stop", 0, choice.assembler.tokens))
        elif isinstance(message, Admitted):
            if not self.admitted:
                self.admitted = True
                self.cached_tokens = message.cached_tokens
                choice.timer.admitted()
        elif isinstance(message, PromptLogprobs):  # scoring is progress: no queue timeout after it
            self.admitted = True
            yield choice.scored(self.request.prompt_of(choice.index), message)
        elif isinstance(message, Finished):
            yield from choice.finish(message)
        if self.finished:
            self._log()

    def _wait_s(self) -> float:
        """Short enough to notice a queue timeout before admission."""
        return KEEPALIVE_S if self.admitted else min(KEEPALIVE_S, float(self._ctx.queue_timeout))

    def _check_queue_timeout(self) -> None:
        timeout = self._ctx.queue_timeout
        if not self.admitted and time.perf_counter() - self._arrived > timeout:
            self.close()
            raise overloaded(f"The request waited {timeout} s for a batch slot; retry later",
                             retry_after=min(60, timeout))

    def overall_reason(self) -> FinishReason:
        reasons = [c.done.reason for c in self.choices if c.done is not None]
        for worst in (FinishReason.ERROR, FinishReason.ABORT):
            if worst in reasons:
                return worst
        return reasons[0] if reasons else FinishReason.ABORT

    def _log(self) -> None:
        reason = self.overall_reason().value
        prompt = sum(len(p) for p in self.request.prompts)
        self.choices[0].timer.finished(reason, prompt, self.cached_tokens)
        log_completion(self.request.log_id, reason, prompt, self.completion_tokens,
                       time.perf_counter() - self._arrived, self.request.prompt_text,
                       cached_tokens=self.cached_tokens, model=self._ctx.engine.model_id)

    def abort(self) -> None:
        for i, stream in enumerate(self._streams):
            if stream.finished is None:
                self._ctx.engine.abort(f"{self.request.id}/{i}")

    def close(self) -> None:
        """The client left, the text ended, or an error: free every slot (no-op once finished)."""
        if self._closed:
            return
        self._closed = True
        disconnect.stop(self._watcher)
        self._watcher = None
        self.abort()
