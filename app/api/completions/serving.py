"""/v1/completions at the edge: prompts (text or token ids) become one GenerationRequest with n
choices per prompt; events become OpenAI's text_completion body or its chunk stream.

`echo` puts the prompt in front of each choice's text; with `logprobs` it also scores the
prompt (on the engine thread, in chunks), which is what evaluation harnesses read.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterator, Optional

from app.api.chat.shapes import FINISH_REASON, usage
from app.api.completions.protocol import CompletionRequest
from app.api.serving import Serving
from app.errors import APIError, bad_request
from app.generation.events import ChoiceDone, FinishReason, LogprobEntry, PromptScored, TextDelta
from app.generation.generation import Generation
from app.generation.request import GenerationRequest
from app.sse import SSE_DONE, SSE_KEEPALIVE, sse
from app.text import offload


class CompletionsServing(Serving):
    def prepare(self, body: CompletionRequest, client: str, request_id: str) -> GenerationRequest:
        self.admission.resolve_model(body.model)
        n = body.n or 1
        self.admission.check_n(n * len(body.prompts()))
        if body.logit_bias:
            self.admission.check_token_ids(body.logit_bias_ids(), "logit_bias")
        prompts = [self._tokens(p) for p in body.prompts()]
        longest = max(len(p) for p in prompts)
        max_tokens = body.max_tokens if body.max_tokens == 0 else \
            self.admission.max_tokens(body.max_tokens, "max_tokens", longest, prompt_param="prompt")
        self.admission.admit(longest, max_tokens, n * len(prompts), client)
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        return GenerationRequest(
            f"cmpl-{uuid.uuid4().hex}", prompts[0], max_tokens, body.sampling_params(), n=n,
            logprobs=body.logprobs, stop_strings=tuple(body.stop_strings), ignore_eos=body.ignore_eos,
            cache_scope=self.cache_scope(client), log_id=request_id,
            prompt_text=repr(body.prompt) if self.settings.log_prompts else None,
            more_prompts=tuple(prompts[1:]), prompt_logprobs=scored)

    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("A prompt is empty", param="prompt")
            return offload.encode(self.ctx.text, prompt, "prompt")
        self.admission.check_token_ids(prompt, "prompt")
        return list(prompt)

    def complete(self, request: GenerationRequest, body: CompletionRequest, environ: dict) -> dict:
        generation = Generation(self.ctx, request, environ)
        states = [_ChoiceText(self, request, body, i) for i in range(request.choices)]
        for event in generation.events():
            if event is not None:
                _route(states, event, request.n)
        choices = []
        for state, c in zip(states, generation.choices):
            if c.done.reason is FinishReason.ERROR:
                raise APIError(500, f"Generation failed: {c.done.error}", type="server_error", code="engine_error")
            choices.append(state.body(c.done.reason))
        return _completion(request.id, self.ctx.engine.model.model_id, choices, self._usage(request, generation))

    def stream(self, request: GenerationRequest, body: CompletionRequest, environ: dict) -> Iterator[str]:
        generation = Generation(self.ctx, request, environ)
        states = [_ChoiceText(self, request, body, i) for i in range(request.choices)]
        model, created = self.ctx.engine.model.model_id, int(time.time())
        try:
            for event in generation.events():
                if event is None:
                    yield SSE_KEEPALIVE
                    continue
                if isinstance(event, ChoiceDone) and event.reason is FinishReason.ERROR:
                    yield sse(APIError(500, f"Generation failed: {event.error}", type="server_error",
                                       code="engine_error").body())
                    yield SSE_DONE
                    return
                for index, piece in _route(states, event, request.n):
                    yield sse(_chunk(request.id, created, model, piece, body.include_usage))
            if body.include_usage:
                yield sse(dict(_completion(request.id, model, [], self._usage(request, generation)), created=created))
            yield SSE_DONE
        finally:
            generation.close()

    @staticmethod
    def _usage(request: GenerationRequest, generation: Generation) -> dict:
        return usage(sum(len(p) for p in request.prompts), generation.completion_tokens,
                     generation.cached_tokens)


class _ChoiceText:
    """One choice's text and legacy logprobs ({tokens, token_logprobs, top_logprobs, text_offset})."""

    def __init__(self, serving: CompletionsServing, request: GenerationRequest, body: CompletionRequest, index: int):
        self.index = index
        self.echo = bool(body.echo)
        self.want_logprobs = body.logprobs is not None
        prompt = body.prompts()[index // request.n]
        self.prompt_text = prompt if isinstance(prompt, str) else serving.ctx.text.hf_tokenizer.decode(prompt)
        self.text: list[str] = []
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self._offset = 0

    def add(self, text: str, entries: list[Optional[LogprobEntry]]) -> dict:
        """A piece of this choice (text + its logprobs) in the legacy shape."""
        self.text.append(text)
        piece = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries if self.want_logprobs else []:
            token, scored = entry.token, entry.logprob is not None  # a prompt's first token has none
            piece["tokens"].append(token)
            piece["token_logprobs"].append(entry.logprob)
            piece["top_logprobs"].append({t.token: t.logprob for t in entry.top} if scored else None)
            piece["text_offset"].append(self._offset)
            self._offset += len(token)
        for key in self.lp:
            self.lp[key] += piece[key]
        return {"text": text, "index": self.index, "logprobs": piece if self.want_logprobs else None,
                "finish_reason": None}

    def body(self, reason: FinishReason) -> dict:
        return {"text": "".join(self.text), "index": self.index,
                "logprobs": self.lp if self.want_logprobs else None, "finish_reason": FINISH_REASON[reason]}


def _route(states: list[_ChoiceText], event, n: int) -> list[tuple[int, dict]]:
    """Apply one event to the choices it concerns; the streamed pieces it makes."""
    if isinstance(event, PromptScored):  # scored once per prompt: every choice of that prompt echoes it
        first = event.index - event.index % n
        return [(i, states[i].add(states[i].prompt_text, event.entries)) for i in range(first, first + n)]
    state = states[event.index]
    if isinstance(event, TextDelta):
        pieces = []
        if state.echo and not state.text:  # echo without logprobs: no PromptScored comes first
            pieces.append((state.index, state.add(state.prompt_text, [])))
        return pieces + [(state.index, state.add(event.text, event.logprobs))]
    if isinstance(event, ChoiceDone):
        pieces = [(state.index, state.add(state.prompt_text, []))] if state.echo and not state.text else []
        return pieces + [(state.index, {"text": "", "index": state.index, "logprobs": None,
                                        "finish_reason": FINISH_REASON[event.reason]})]
    return []


def _completion(completion_id: str, model: str, choices: list[dict], usage_body: Optional[dict]) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_body}


def _chunk(completion_id: str, created: int, model: str, piece: dict, include_usage: bool) -> dict:
    chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": None, "choices": [piece]}
    if include_usage:
        chunk["usage"] = None
    return chunk
