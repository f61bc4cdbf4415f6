"""Hermes tool calls (Qwen2.5; also what Orchard renders for chat templates without tools):

    Some text.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Rules, the same for `extract` and for feed/finish unless said otherwise:
- Every `<tool_call>` and `</tool_call>` is markup, never content, wherever it appears outside a
  call object (inside a JSON string of a call it is just text). The tags may arrive whole (one
  Qwen2.5 token) or split over any number of deltas: a tail that could still become a tag is
  held back until it is clearly not one (or the generation ends: then it is content).
- `<tool_call>`, JSON whitespace, then a valid call object (see _json_call.py: non-empty string
  "name", "arguments" or "parameters") is a call; the object is markup too. The closing tag is
  optional (a generation may end right after the object); text between the object and it is
  ordinary text.
- A `<tool_call>` not followed by a valid call object (not JSON, invalid JSON, no name, the
  generation ended mid-object) is dropped alone, and the text after it is read again as ordinary
  text: it becomes content (a later tag in it still counts).
  Streaming exception: once a call's name was streamed it stays a call, with the arguments
  streamed so far, even if its object turns out invalid or unterminated; `extract` would give
  that text as content.
- Content follows base.py's rule: whitespace-only stretches around markup are dropped, other
  text kept verbatim (text before a call keeps its trailing newline).
- parallel=False: calls after the first are consumed without being reported.
"""
from __future__ import annotations

from ._json_call import JsonToolParser, parse_call_object, skip_ws
from .base import ToolCall, ToolCallDelta, join_content, new_call_id, register

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def find_tag(text: str, start: int = 0) -> tuple[int, str]:
    """The first tag in text[start:]: (index, tag), or (-1, "")."""
    i = text.find("<", start)
    while i >= 0:
        for tag in (OPEN, CLOSE):
            if text.startswith(tag, i):
                return i, tag
        i = text.find("<", i + 1)
    return -1, ""


def held_length(text: str) -> int:
    """How much of text's end could still grow into a tag (a tag has a single "<", at its start)."""
    tail = text[text.rfind("<"):] if "<" in text else ""
    return len(tail) if tail and (OPEN.startswith(tail) or CLOSE.startswith(tail)) else 0


@register
class HermesParser(JsonToolParser):
    name = "hermes"

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._buf = ""  # received and not yet consumed
        self._state = "text"  # text | block (just after <tool_call>) | object
        self._gap = ""  # whitespace after <tool_call>: read again as text if no call follows

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        self._drain(out, deltas, final=True)
        while self._state == "object":  # the generation ended inside an object
            more, is_call = self._end_stream()
            deltas += more
            self._close(is_call, "")
            self._drain(out, deltas, final=True)
        # state "block" here: only whitespace followed the last <tool_call>; dropped, like extract
        out.append(self._content.finish())
        return "".join(out), deltas

    def _drain(self, out: list[str], deltas: list[ToolCallDelta], final: bool) -> None:
        more = True
        while self._buf and more:
            if self._state == "text":
                more = self._text_step(out, final)
            elif self._state == "block":
                more = self._block_step()
            else:
                more = self._object_step(deltas)

    def _text_step(self, out: list[str], final: bool) -> bool:
        i, tag = find_tag(self._buf)
        if i < 0:
            cut = len(self._buf) - (0 if final else held_length(self._buf))
            out.append(self._content.text(self._buf[:cut]))
            self._buf = self._buf[cut:]
            return False
        out.append(self._content.text(self._buf[:i]))
        self._content.markup()
        self._buf = self._buf[i + len(tag):]
        if tag == OPEN:
            self._state, self._gap = "block", ""
        return True

    def _block_step(self) -> bool:
        j = skip_ws(self._buf, 0)
        self._gap, self._buf = self._gap + self._buf[:j], self._buf[j:]
        if not self._buf:
            return False
        if self._buf[0] == "{":
            self._open_stream()
            self._state = "object"
        else:  # a stray <tool_call>: drop it alone
            self._buf, self._state = self._gap + self._buf, "text"
        return True

    def _close(self, is_call: bool, rest: str) -> None:
        if is_call:
            self._content.markup()
            self._buf = rest
        else:  # not a call: only the <tool_call> is dropped, the rest is read again as text
            self._buf = self._gap + self._stream.text + rest
        self._state = "text"

    @classmethod
    def extract(cls, text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
        stretches: list[str] = []
        calls: list[ToolCall] = []
        pos, marked = 0, False
        while True:
            i, tag = find_tag(text, pos)
            if i < 0:
                stretches.append(text[pos:])
                return join_content(stretches, marked), calls
            stretches.append(text[pos:i])
            pos, marked = i + len(tag), True
            if tag == CLOSE:
                continue
            parsed = parse_call_object(text, skip_ws(text, pos))
            if parsed is None:
                continue  # a stray <tool_call>: the text after it is read again
            pos, name, arguments = parsed
            if parallel or not calls:
                calls.append(ToolCall(new_call_id(), name, arguments))
