"""Tool-call parsers, one per model family's syntax: whole text (`extract`) and streaming
(`feed`/`finish`) with the same results. No Flask, no MLX: pure Python and json.

    parser = get_parser("hermes")(parallel=True)
    content, deltas = parser.feed(text_delta)   # ... then parser.finish(); parser.calls

Rules callers must know are in base.py (content), _json_call.py (the call object, arguments
text) and each format's module.
"""
from __future__ import annotations

from .base import PARSERS, ToolCall, ToolCallDelta, ToolParser, get_parser, new_call_id
from .hermes import HermesParser  # importing a format registers it
from .llama3_json import Llama3JsonParser

__all__ = ["PARSERS", "ToolCall", "ToolCallDelta", "ToolParser", "get_parser", "new_call_id",
           "HermesParser", "Llama3JsonParser"]
