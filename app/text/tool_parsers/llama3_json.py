"""Llama 3.x JSON tool calls (vLLM's llama3_json):

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

Rules, the same for `extract` and for feed/finish unless said otherwise:
- The reply is a tool reply only if, after JSON whitespace and an optional `<|python_tag|>`
  (markup, dropped) and more whitespace, it starts with "{". Otherwise it is plain content and
  nothing more is parsed: verbatim, or without the tag if it had one. Streaming decides at the
  first non-whitespace character (after the tag, if one is arriving).
- Then come call objects (see _json_call.py; "parameters" or "arguments"), separated by ";" with
  optional JSON whitespace around it. Objects and separators are markup.
- The first thing that does not fit (an object that is not a valid call, a missing ";", any text)
  ends the calls: from there (the separator before a failed object included) the text is content.
  Streaming exception: once a call's name was streamed it stays a call, with the arguments
  streamed so far, even if its object turns out invalid or unterminated; `extract` would give
  that text as content.
- Content follows base.py's rule: whitespace-only stretches around markup are dropped.
- parallel=False: calls after the first are consumed without being reported.
"""
from __future__ import annotations

import re

from ._json_call import JsonToolParser, parse_call_object, skip_ws
from .base import ToolCall, ToolCallDelta, join_content, new_call_id, register

TAG = "<|python_tag|>"
_PREFIX = re.compile(r"[ \t\n\r]*(<\|python_tag\|>)?")
_GAP = re.compile(r"[ \t\n\r]*(;[ \t\n\r]*)?")  # what may come between the tag or an object and the next object


@register
class Llama3JsonParser(JsonToolParser):
    name = "llama3_json"

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._buf = ""  # received and not yet consumed
        self._state = "start"  # start | object | between (tag or object seen, next?) | tail (all content)
        self._pending = ""  # whitespace/separator before the current object: content if it fails
        self._need_sep = False  # between: the next object needs a ";" (after an object, not after the tag)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        self._drain(out, deltas, final=True)
        if self._state == "object":  # the generation ended inside an object
            more, is_call = self._end_stream()
            deltas += more
            self._close(is_call, "")
        if self._state == "between":  # a trailing gap or ";" is ordinary text
            self._buf, self._pending, self._state = self._pending + self._buf, "", "tail"
        self._drain(out, deltas, final=True)
        out.append(self._content.finish())
        return "".join(out), deltas

    def _drain(self, out: list[str], deltas: list[ToolCallDelta], final: bool) -> None:
        more = True
        while self._buf and more:
            if self._state == "start":
                more = self._start_step(final)
            elif self._state == "between":
                more = self._between_step()
            elif self._state == "object":
                more = self._object_step(deltas)
            else:
                out.append(self._content.text(self._buf))
                self._buf, more = "", False

    def _start_step(self, final: bool) -> bool:
        m = _PREFIX.match(self._buf)
        rest = self._buf[m.end():]
        if m.group(1):
            self._content.markup()
            self._buf, self._state, self._need_sep = rest, "between", False
        elif TAG.startswith(rest) and not final:  # only whitespace so far, or a tag may be arriving
            return False
        elif rest.startswith("{"):
            self._pending, self._buf = self._buf[:m.end()], rest
            self._open_stream()
            self._state = "object"
        else:
            self._state = "tail"
        return True

    def _between_step(self) -> bool:
        text = self._pending + self._buf
        m = _GAP.match(text)
        if m.end() == len(text):  # all of it may still be a gap before an object
            self._pending, self._buf = text, ""
            return False
        if text[m.end()] == "{" and bool(m.group(1)) == self._need_sep:
            self._pending, self._buf = text[:m.end()], text[m.end():]
            self._open_stream()
            self._state = "object"
        else:
            self._pending, self._buf, self._state = "", text, "tail"
        return True

    def _close(self, is_call: bool, rest: str) -> None:
        if is_call:
            self._content.markup()
            self._pending, self._buf = "", rest
            self._state, self._need_sep = "between", True
        else:  # the calls end here: what came since the last markup is content
            self._buf = self._pending + self._stream.text + rest
            self._pending, self._state = "", "tail"

    @classmethod
    def extract(cls, text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        m = _PREFIX.match(text)
        marked = bool(m.group(1))
        tail = m.end() if marked else 0  # where the text not (yet) taken as markup starts
        pos = skip_ws(text, m.end())
        while True:
            parsed = parse_call_object(text, pos)
            if parsed is None:
                break
            tail, name, arguments = parsed
            marked = True
            if parallel or not calls:
                calls.append(ToolCall(new_call_id(), name, arguments))
            gap = _GAP.match(text, tail)
            if not gap.group(1) or not text.startswith("{", gap.end()):
                break
            pos = gap.end()
        return join_content([text[tail:]], marked), calls
