"""Follows a JSON object char by char, for the streaming path (see _json_call.py).

Tracks strings, nesting, and which top-level member (key, value) each char belongs to, so the
call's name can be announced as soon as its string ends and its arguments streamed as they come.
"""
from __future__ import annotations

import json
from typing import Optional

WS = " \t\n\r"  # JSON whitespace
SYNONYMS = {"parameters": "arguments"}


class ObjectScanner:
    """Follows a JSON object char by char: strings, nesting, and which top-level member each char
    belongs to. Sets `broken` as soon as the text cannot be a valid object (a stray char between
    members, a member value that is not JSON); it does not check everything (parse_call_object does)."""

    def __init__(self):
        self.text = ""
        self.depth = 0
        self.in_str = self._esc = False
        self.phase = "key_wait"  # key_wait | key | colon | value_wait | value
        self.key: Optional[str] = None  # the current member's key (None: ignored duplicate)
        self.value_start = 0
        self.closed = self.broken = False
        self._key_start = 0
        self._value_done = False  # the current value is a complete string/array/object
        self._seen: set = set()

    def step(self, i: int) -> Optional[str]:
        """Consume text[i]: "value" if it is part of the current top-level value, "end" if it ends it."""
        ch = self.text[i]
        if self.depth == 0:  # the opening brace
            self.depth = 1
            return None
        if self.in_str:
            return self._string_char(ch, i)
        if self.phase == "value_wait" and ch not in WS:
            self.phase, self.value_start, self._value_done = "value", i, False
        if self.phase == "value":
            return self._value_char(ch, i)
        if ch == '"' and self.phase == "key_wait":
            self.in_str, self.phase, self._key_start = True, "key", i
        elif ch == ":" and self.phase == "colon":
            self.phase = "value_wait"
        elif ch == "}" and self.phase == "key_wait":
            self.closed = True
        elif ch not in WS:
            self.broken = True
        return None

    def _string_char(self, ch: str, i: int) -> Optional[str]:
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            self.in_str = False
            self._value_done = self.depth == 1
            if self.phase == "key":
                self._set_key(self.text[self._key_start:i + 1])
        return "value" if self.phase == "value" else None

    def _value_char(self, ch: str, i: int) -> str:
        if self.depth == 1 and ch in ",}":
            self.phase, self.closed = "key_wait", ch == "}"
            self.broken = self.broken or not _is_json(self.text[self.value_start:i])
            return "end"
        if self._value_done and ch not in WS:
            self.broken = True  # text after a complete value (streamed arguments stop before it)
        elif ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]" and self.depth > 1:
            self.depth -= 1
            self._value_done = self.depth == 1
        return "value"

    def _set_key(self, raw: str) -> None:
        try:
            key = json.loads(raw)
        except ValueError:
            key = None
        key = SYNONYMS.get(key, key)
        self.key = None if key in self._seen else key  # the first of duplicate keys counts
        self._seen.add(key)
        self.phase = "colon"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True
