"""The tool-call parser interface, the registry of parsers, and the content rule they share.

A parser splits generated text into content and tool calls, either all at once (`extract`) or
while it is generated (`feed` for each text delta, then `finish`). The two are separate code
paths and give the same content and the same (name, arguments) calls; see each format's module
for its rules and for the one case where streaming cannot match (a call already announced).

Content rule (all parsers): the content is the text between the pieces of tool markup. When a
reply contains any markup, whitespace-only stretches between, before or after markup are
dropped and every other stretch is kept verbatim (so "Let me check.\\n" keeps its newline). A
reply without markup is returned verbatim. `ContentFilter` (streaming) and `join_content`
(whole text) implement this one rule.
"""
from __future__ import annotations

import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style call id: "call_" and 24 random letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


@dataclass
class ToolCall:
    """A complete call; `arguments` is the JSON text of the arguments value as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """One streamed piece of a call, in OpenAI's delta shape: id and name only on a call's first delta."""

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


class ToolParser(ABC):
    """One model family's tool-call syntax. One instance parses one generated reply."""

    name: ClassVar[str]

    def __init__(self, parallel: bool = True):
        # parallel=False: only the first call is reported; the markup of later calls is dropped
        self.parallel = parallel
        self._calls: list[ToolCall] = []
        self._content = ContentFilter()

    @abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take the next text delta; return the content and call deltas it releases."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The generation ended: release whatever was held back."""

    @classmethod
    @abstractmethod
    def extract(cls, text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
        """Parse a whole reply: (content, calls)."""

    @property
    def calls(self) -> list[ToolCall]:
        """The calls streamed so far (same ids as the deltas), arguments as streamed so far."""
        return list(self._calls)


class ContentFilter:
    """The content rule for streaming: holds a whitespace-only stretch until it is known whether
    text follows it in the same stretch (kept) or markup / the end does (dropped if any markup)."""

    def __init__(self):
        self.marked = False  # some markup was seen
        self._spaces = ""  # the current stretch so far, while it is whitespace only
        self._in_text = False  # the current stretch has non-whitespace text

    def text(self, s: str) -> str:
        if self._in_text:
            return s
        if not s.strip():
            self._spaces += s
            return ""
        out, self._spaces, self._in_text = self._spaces + s, "", True
        return out

    def markup(self) -> None:
        self.marked, self._spaces, self._in_text = True, "", False

    def finish(self) -> str:
        out = "" if self.marked else self._spaces
        self._spaces = ""
        return out


def join_content(stretches: list[str], marked: bool) -> str:
    """The content rule for a whole reply cut into the stretches between markup."""
    if not marked:
        return "".join(stretches)
    return "".join(s for s in stretches if s.strip())


PARSERS: dict[str, type[ToolParser]] = {}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    PARSERS[cls.name] = cls
    return cls


def get_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; ValueError naming the known ones otherwise."""
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None
