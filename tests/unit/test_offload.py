"""app/text/offload.py: long inputs are prepared in a worker thread, short ones inline, and
errors come back as the same API errors."""
from __future__ import annotations

import threading

import pytest

from app.errors import APIError, bad_request
from app.text import offload


class FakeText:
    """ModelText's surface that render_prompt and encode use, recording the calling thread."""
    template_renders_tools = False

    def __init__(self):
        self.threads: list[int] = []

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(m["content"] for m in messages), "messages")

    def encode(self, text, param):
        self.threads.append(threading.get_ident())
        if "{%" in text:
            raise bad_request("The messages cannot be rendered by this model's chat template: boom", param=param)
        return list(range(len(text) // 4))


@pytest.mark.parametrize("chars, inline", [(10, True), (offload.INLINE_CHARS - 10, True),
                                           (offload.INLINE_CHARS, False), (200_000, False)])
def test_long_inputs_leave_the_calling_thread(chars, inline):
    text = FakeText()
    ids = offload.render(text, [{"role": "user", "content": "x" * chars}], None)
    assert len(ids) == chars // 4
    assert (text.threads == [threading.get_ident()]) is inline


@pytest.mark.parametrize("call", [
    lambda text, content: offload.render(text, [{"role": "user", "content": content}], None),
    lambda text, content: offload.encode(text, content, "messages"),
])
@pytest.mark.parametrize("chars", [10, 50_000])
def test_errors_come_back_as_the_same_api_error(call, chars):
    with pytest.raises(APIError) as raised:
        call(FakeText(), "{%" + "x" * chars)
    assert raised.value.status == 400 and "chat template" in raised.value.message


def test_tools_and_structured_content_count_toward_the_size():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"description": "d" * 5000}}}]
    assert offload._chars(tools) > 5000
    assert offload._chars([{"role": "user", "content": [{"type": "text", "text": "t" * 3000}]}]) > 3000


def test_tokenize_passes_the_text_through():
    class Tokenizer:
        def encode(self, text):
            return [threading.get_ident()]

    assert offload.tokenize(Tokenizer(), "short") == [threading.get_ident()]
    assert offload.tokenize(Tokenizer(), "long " * 1000) != [threading.get_ident()]
