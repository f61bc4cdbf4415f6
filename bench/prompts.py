"""Prompt sets: a small fixed built-in list, or one loaded from a file."""
from __future__ import annotations

import json
from pathlib import Path

BUILTIN_PROMPTS: tuple[str, ...] = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map works, including collisions and resizing.",
    "Describe the water cycle to a ten-year-old in a few paragraphs.",
    "List ten creative uses for an old bicycle and explain each briefly.",
    "Summarize the main causes of the French Revolution.",
    "Write a Python function that checks whether a string is a palindrome, then explain it.",
    "Compare electric cars and gasoline cars in terms of cost, maintenance and emissions.",
    "Give a step-by-step recipe for a simple vegetable soup.",
    "Explain the difference between TCP and UDP with examples of when to use each.",
    "Write a polite email asking a colleague to review a pull request by Friday.",
    "Describe what happens in the body during a 30-minute run.",
    "Invent a board game for four players and explain its rules.",
)


def load_prompts(path: str | None) -> list[str]:
    """Return prompts from path, or the built-in set when path is None.

    Formats: .json (list of strings or of {"prompt": ...}), .jsonl (one string
    or {"prompt": ...} per line), anything else: one prompt per non-empty line.
    """
    if path is None:
        return list(BUILTIN_PROMPTS)
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        items = json.loads(text)
    elif path.endswith(".jsonl"):
        items = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    else:
        items = [ln.strip() for ln in text.splitlines() if ln.strip()]
    prompts = [it["prompt"] if isinstance(it, dict) else str(it) for it in items]
    if not prompts:
        raise ValueError(f"no prompts found in {path}")
    return prompts
