"""Typed events a Generation yields, and the finish reasons every API maps to its own words."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from app.text.tool_parsers import ToolCall, ToolCallDelta


class FinishReason(str, enum.Enum):
    STOP = "stop"  # the model ended (EOS) or a stop string matched
    LENGTH = "length"  # max_tokens or the context ran out
    TOOL_CALLS = "tool_calls"  # the model ended after calling tools
    ABORT = "abort"  # the server ended it (drain)
    ERROR = "error"


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: list[int]
    logprob: float


@dataclass(frozen=True)
class LogprobEntry:
    token: str
    bytes: list[int]
    logprob: Optional[float]  # None only for a prompt's first token
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class TextDelta:
    index: int  # the choice
    text: str
    logprobs: list[LogprobEntry] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCallEvent:
    index: int  # the choice
    delta: ToolCallDelta


@dataclass(frozen=True)
class PromptScored:
    """Log-probabilities of choice `index`'s prompt tokens (the first entry is None)."""

    index: int
    entries: list[LogprobEntry]


@dataclass(frozen=True)
class ChoiceDone:
    index: int
    reason: FinishReason
    completion_tokens: int
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: Optional[str] = None


Event = TextDelta | ToolCallEvent | PromptScored | ChoiceDone
