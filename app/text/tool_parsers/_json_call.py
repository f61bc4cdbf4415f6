"""The JSON call object that the JSON-based formats share: {"name": ..., "arguments": {...}}.

A call object is a JSON object with a non-empty string "name" and, optionally, an "arguments"
value ("parameters" is a synonym) of any JSON type. Of duplicate keys (synonyms included) the
first counts. The call's arguments are the exact text of that value as the model wrote it
(no re-serialisation), or "{}" when it is missing.

Two readers, one per path:
- `parse_call_object` (whole text): json's raw_decode member by member, so the raw slice of the
  arguments value is known.
- `CallStream` (streaming): follows the object char by char. Once the "name" string is complete
  it emits the call's first delta (index, id, name, ""), then the arguments text as it arrives,
  holding back only whitespace that may turn out to trail the value. If "arguments" comes before
  "name", nothing is emitted until the object is complete and valid, then one delta carries it
  all. When the object closes it is checked with `parse_call_object`. An object that is known
  not to be a call before anything was announced (its text cannot be a valid object, or it
  closed without a name) is handed back to the parser, which reads its text again, as `extract`
  does. An announced call whose object turns out invalid or unterminated stays a call with the
  arguments emitted so far (deltas cannot be taken back; the arguments stop where the text stops
  being valid, and the rest of the object, as far as it can be told, is dropped): the one way
  streaming can differ from `extract`.
"""
from __future__ import annotations

import json
from typing import Optional

from ._json_scan import SYNONYMS, WS, ObjectScanner
from .base import ToolCall, ToolCallDelta, ToolParser, new_call_id

_DECODER = json.JSONDecoder()


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WS:
        pos += 1
    return pos


def parse_call_object(text: str, start: int) -> Optional[tuple[int, str, str]]:
    """The call object starting at text[start]: (end, name, arguments text), or None if that is
    not a complete, valid call object."""
    if not text.startswith("{", start):
        return None
    try:
        members, end = _members(text, start)
    except (ValueError, IndexError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    name = members.get("name", (None, ""))[0]
    if not isinstance(name, str) or not name:
        return None
    return end, name, members.get("arguments", (None, "{}"))[1]


def _members(text: str, pos: int) -> tuple[dict, int]:
    """The object's top-level members {key: (value, raw text)} and the index just after it."""
    members: dict = {}
    pos = skip_ws(text, pos + 1)
    if text[pos] == "}":
        return members, pos + 1
    while True:
        if text[pos] != '"':
            raise ValueError("a key was expected")
        key, pos = _DECODER.raw_decode(text, pos)
        pos = skip_ws(text, pos)
        if text[pos] != ":":
            raise ValueError("':' was expected")
        start = skip_ws(text, pos + 1)
        value, pos = _DECODER.raw_decode(text, start)
        members.setdefault(SYNONYMS.get(key, key), (value, text[start:pos]))
        pos = skip_ws(text, pos)
        if text[pos] == "}":
            return members, pos + 1
        if text[pos] != ",":
            raise ValueError("',' was expected")
        pos = skip_ws(text, pos + 1)


class CallStream:
    """Streams one call object (see the module docstring) as call number `index`."""

    def __init__(self, index: int):
        self.index = index
        self.call: Optional[ToolCall] = None  # set once announced
        self._scan = ObjectScanner()
        self._deferred = False  # "arguments" came before "name": emit all at the end
        self._spaces = ""  # whitespace in the arguments, held until a non-space follows
        self._out = ""  # arguments text released by the current feed

    @property
    def text(self) -> str:
        return self._scan.text

    def feed(self, chunk: str) -> tuple[list[ToolCallDelta], Optional[str]]:
        """Take more text: (deltas, the text after the object once it closed, else None)."""
        deltas: list[ToolCallDelta] = []
        scan, start = self._scan, len(self._scan.text)
        scan.text += chunk
        for i in range(start, len(scan.text)):
            event = scan.step(i)
            if event is not None:
                self._member_char(event, i, deltas)
            if scan.closed or (scan.broken and self.call is None):  # done, or known not to be a call
                rest, scan.text = scan.text[i + 1:], scan.text[:i + 1]
                return self._flush(deltas), rest
        return self._flush(deltas), None

    def end(self) -> tuple[list[ToolCallDelta], bool]:
        """The object closed or the text ended: (last deltas, whether this is a call)."""
        parsed = parse_call_object(self.text, 0) if self._scan.closed else None
        if parsed is None:
            return [], self.call is not None  # an announced call cannot be taken back
        _, name, arguments = parsed
        if self.call is None:
            self.call = ToolCall(new_call_id(), name, arguments)
            return [ToolCallDelta(self.index, self.call.id, name, arguments)], True
        rest = arguments[len(self.call.arguments):]  # "{}" when the arguments were missing
        if not rest or not arguments.startswith(self.call.arguments):
            return [], True
        self.call.arguments = arguments
        return [ToolCallDelta(self.index, arguments=rest)], True

    def _member_char(self, event: str, i: int, deltas: list[ToolCallDelta]) -> None:
        scan, ch = self._scan, self._scan.text[i]
        if scan.broken:
            return  # garbage from here on: announce nothing, stream no more arguments
        if scan.key == "name" and self.call is None and not self._deferred:
            if ch == '"' and not scan.in_str and i > scan.value_start and scan.text[scan.value_start] == '"':
                self._announce(scan.text[scan.value_start:i + 1], deltas)
        elif scan.key == "arguments":
            if self.call is None:
                self._deferred = True
            elif event == "end":
                self._spaces = ""  # whitespace before "," or "}" is not part of the value
            elif ch in WS and not scan.in_str:
                self._spaces += ch
            else:
                self._out += self._spaces + ch
                self._spaces = ""

    def _announce(self, raw_name: str, deltas: list[ToolCallDelta]) -> None:
        try:
            name = json.loads(raw_name)
        except ValueError:
            return  # parse_call_object will reject the object too
        if name:
            self.call = ToolCall(new_call_id(), name, "")
            deltas.append(ToolCallDelta(self.index, self.call.id, name, ""))

    def _flush(self, deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
        if self._out:
            self.call.arguments += self._out
            deltas.append(ToolCallDelta(self.index, arguments=self._out))
            self._out = ""
        return deltas


class JsonToolParser(ToolParser):
    """Streaming plumbing for formats whose calls are JSON call objects: one CallStream at a time."""

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._stream: Optional[CallStream] = None
        self._muted = False  # parallel=False and a call was already reported: parse, report nothing
        self._recorded = False  # the current stream's call is in self._calls

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        self._buf += text
        self._drain(out, deltas, final=False)
        return "".join(out), deltas

    def _drain(self, out: list[str], deltas: list[ToolCallDelta], final: bool) -> None:
        raise NotImplementedError  # each format's state machine over self._buf

    def _open_stream(self) -> None:
        self._stream = CallStream(len(self._calls))
        self._muted = not self.parallel and bool(self._calls)
        self._recorded = False

    def _feed_stream(self, text: str) -> tuple[list[ToolCallDelta], Optional[str]]:
        deltas, rest = self._stream.feed(text)
        return self._report(deltas), rest

    def _end_stream(self) -> tuple[list[ToolCallDelta], bool]:
        deltas, is_call = self._stream.end()
        return self._report(deltas), is_call

    def _object_step(self, deltas: list[ToolCallDelta]) -> bool:
        """Feed the buffer to the open call object; once it closes, let the format `_close` it.
        False when more text is needed."""
        more, rest = self._feed_stream(self._buf)
        deltas += more
        if rest is None:
            self._buf = ""
            return False
        more, is_call = self._end_stream()
        deltas += more
        self._close(is_call, rest)
        return True

    def _close(self, is_call: bool, rest: str) -> None:
        raise NotImplementedError  # each format decides what follows a call object

    def _report(self, deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
        if self._muted:
            return []
        if self._stream.call is not None and not self._recorded:
            self._calls.append(self._stream.call)
            self._recorded = True
        return deltas
