"""Turns one request's token deltas into text deltas, applying stop strings.

Runs on the request greenlet. Text that could be the start of a stop string is
held back until it is clearly not one, so a streamed answer never shows a stop
string, and streamed and non-streamed texts are identical.
"""
from __future__ import annotations

from typing import Optional

from engine.detokenizer import Detokenizer


class TextAssembler:
    def __init__(self, detokenizer: Detokenizer, stop_strings: list[str]):
        self._detok = detokenizer
        self._stops = stop_strings
        self._hold = max((len(s) for s in stop_strings), default=1) - 1
        self._pending = ""  # decoded but not yet released text
        self.stopped = False  # a stop string was found: the request should end now
        self.matched: Optional[str] = None  # which stop string (Anthropic reports it)
        self.tokens = 0

    def add(self, token_ids: list[int]) -> str:
        """Text safe to release after these tokens."""
        if self.stopped:
            return ""
        self.tokens += len(token_ids)
        self._pending += self._detok.add(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        if self.stopped:
            return ""
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        cut = _first_stop(self._pending, self._stops)
        if cut is not None:
            self.stopped = True
            self.matched = next(s for s in self._stops if self._pending.find(s) == cut)
            out, self._pending = self._pending[:cut], ""
            return out
        keep = 0 if final else _partial_stop_suffix(self._pending, self._stops, self._hold)
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out


def _first_stop(text: str, stops: list[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_suffix(text: str, stops: list[str], hold: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for length in range(min(hold, len(text)), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stops):
            return length
    return 0
