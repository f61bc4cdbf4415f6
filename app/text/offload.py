"""Template rendering and tokenizing of long inputs, off the event loop.

Every API's `prepare()` runs on its request's greenlet, i.e. on the gevent hub: tokenizing
a 16k-token prompt there stalled every stream ~60 ms on the 2-core machine, a 64k-token
one ~300 ms. Long inputs go to a gevent ThreadPool instead (real OS threads). The fast
tokenizer releases the GIL while it encodes, and Jinja, which holds it, is preempted every
`sys.getswitchinterval()` (5 ms), so the hub keeps delivering chunks meanwhile. Short ones
stay inline: a hop costs ~20 us and tokenizing 2,000 characters ~0.5 ms, both well under
anything a stream notices.

Errors raised in the thread (a template's 400, an empty prompt) come back as values and are
raised here as they were, so callers see the same API errors either way. The threads keep
normal priority: a niced one that holds the GIL (Jinja, transformers' Python parts) while
the kernel passes it over stalls the hub behind it (measured: a 267 ms gap under load,
against 30 ms without). The tokenizers are only read here (never reconfigured: no
truncation or padding is set), so threads may share them.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

from gevent.threadpool import ThreadPool

from app.text.chat_prompt import render_prompt

INLINE_CHARS = 2_000  # ~500 tokens: below this the thread hop buys nothing
THREADS = 4  # long prompts prepared at once; more wait their turn
T = TypeVar("T")
_pool: Optional[ThreadPool] = None


def off_loop(chars: int, fn: Callable[..., T], *args) -> T:
    """fn(*args); in a worker thread when the input is `chars` long or longer."""
    global _pool
    if chars < INLINE_CHARS:
        return fn(*args)
    if _pool is None:
        _pool = ThreadPool(THREADS)  # bound to this hub: created on the first greenlet that needs it
    ok, value = _pool.apply(_as_value, (fn, args))
    if not ok:
        raise value
    return value


def _as_value(fn: Callable[..., T], args: tuple) -> tuple[bool, object]:
    """In the pool thread: the exception comes back as a value (gevent would print it as a
    crash first), to be raised on the request's greenlet."""
    try:
        return True, fn(*args)
    except Exception as exc:
        return False, exc


def render(text, messages: list[dict], tools: Optional[list[dict]]) -> list[int]:
    """`render_prompt` (template + tokenize) for chat-shaped messages, off the loop when long."""
    return off_loop(_chars(messages) + _chars(tools or []), render_prompt, text, messages, tools)


def encode(text, prompt: str, param: str) -> list[int]:
    """`ModelText.encode` of a plain prompt (completions), off the loop when long."""
    return off_loop(len(prompt), text.encode, prompt, param)


def tokenize(tokenizer, text: str) -> list[int]:
    """A tokenizer's `encode(text)` (embeddings' inputs), off the loop when long."""
    return off_loop(len(text), tokenizer.encode, text)


def _chars(items: list[dict]) -> int:
    """Roughly how much text the items hold: their string values, and nested ones (content
    parts, tool calls, schemas) by the length of their repr; cheap next to tokenizing them."""
    total = 0
    for item in items:
        for value in item.values():
            if isinstance(value, str):
                total += len(value)
            elif isinstance(value, (list, dict)):
                total += len(repr(value))
    return total
