"""An Anthropic conversation as OpenAI-shaped chat messages (app/text/chat_prompt.py's input).

Works on the validated blocks of protocol.py by their `type`, so it needs no import of them.
What Claude Code sends that changes the prompt is decided here:
- its billing header (`x-anthropic-billing-header: cc_version=...; cch=<nonce>;`) opens every
  system prompt with a text that changes per request: left out, or no prefix cache would ever
  hit past it (and it says nothing to the model);
- `system` messages inside `messages` (per-turn-control beta) render at their place, except one
  marked `clear_at: "next_user_message"` once a user message follows it;
- a `tool_reference` in a tool result (advanced-tool-use beta: ToolSearch's answer) becomes the
  referenced tool's definition, as Anthropic expands it; such tools come with `defer_loading`
  and are not listed in the prompt's tools section up front.
"""
from __future__ import annotations

import json
from typing import Optional, Union

from app.errors import bad_request

BLOCK_SEPARATOR = "\n\n"  # between text blocks of one turn: clients split paragraphs into blocks
BILLING_HEADER = "x-anthropic-billing-header:"


def without_billing_header(text: str) -> str:
    """The text without Claude Code's billing header line, if it starts with one."""
    return text.partition("\n")[2] if text.startswith(BILLING_HEADER) else text


def system_text(system) -> str:
    """The top-level system prompt, joined, without the billing header (a block of its own, or
    the first line of one)."""
    if system is None:
        return ""
    texts = [system] if isinstance(system, str) else [b.text for b in system]
    kept = [without_billing_header(t) for t in texts]
    return BLOCK_SEPARATOR.join(k for k, t in zip(kept, texts) if k or not t.startswith(BILLING_HEADER))


def chat_messages(system, messages: list, tools: dict[str, dict]) -> list[dict]:
    """`tools`: every tool's chat definition by name, deferred ones included (for references)."""
    text = system_text(system)
    out = [{"role": "system", "content": text}] if text else []
    called: set[str] = set()  # tool_use ids of the assistant turn right before
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for i, message in enumerate(messages):
        blocks = message.blocks()
        _refuse_media(blocks, i)
        if message.role == "assistant":
            out.append(_assistant(blocks, i))
            called = {c["id"] for c in out[-1].get("tool_calls", [])}
        elif message.role == "user":
            out.extend(_user(blocks, i, called, tools))
            called = set()
        elif not (message.clear_at == "next_user_message" and i < last_user):
            # A system message interjects: tool results may still answer the calls before it.
            out.extend(_system(blocks, i))
    return out


def _refuse_media(blocks: list, i: int) -> None:
    for j, block in enumerate(blocks):
        inner = block.content if block.type == "tool_result" and isinstance(block.content, list) else []
        for part in [block, *inner]:
            if part.type in ("image", "document"):
                raise bad_request(f"messages[{i}].content[{j}] has an '{part.type}' block, but this model reads "
                                  f"text only", param=f"messages.{i}.content.{j}", code="unsupported_content")


def _misplaced(i: int, j: int, kind: str, role: str) -> Exception:
    return bad_request(f"messages[{i}].content[{j}]: a {kind} block belongs in {role} message",
                       param=f"messages.{i}.content.{j}")


def _system(blocks: list, i: int) -> list[dict]:
    """Claude Code sends some with no content at all (a per-turn effort statement): nothing to render."""
    texts = []
    for j, block in enumerate(blocks):
        if block.type == "text":
            texts.append(block.text)
        elif block.type in ("tool_use", "tool_result"):
            raise _misplaced(i, j, block.type, "an assistant" if block.type == "tool_use" else "a user")
    return [{"role": "system", "content": BLOCK_SEPARATOR.join(texts)}] if texts else []


def _assistant(blocks: list, i: int) -> dict:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif block.type == "tool_result":
            raise _misplaced(i, j, "tool_result", "a user")
    out: dict = {"role": "assistant", "content": BLOCK_SEPARATOR.join(texts)}
    if calls:
        out["tool_calls"] = calls
    return out


def _user(blocks: list, i: int, called: set[str], tools: dict[str, dict]) -> list[dict]:
    """Tool results become `tool` messages right after the assistant turn that called them (chat
    templates expect that order); the turn's text follows as a user message."""
    results, texts = [], []
    for j, block in enumerate(blocks):
        if block.type == "tool_result":
            if block.tool_use_id not in called:
                raise bad_request(f"messages[{i}].content[{j}] answers tool_use id {block.tool_use_id!r}, which "
                                  f"the assistant message right before did not call",
                                  param=f"messages.{i}.content.{j}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": _result_text(block.content, block.is_error, tools)})
        elif block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            raise _misplaced(i, j, "tool_use", "an assistant")
    if texts or not results:
        results.append({"role": "user", "content": BLOCK_SEPARATOR.join(texts)})
    return results


def _result_text(content: Union[str, list, None], is_error: Optional[bool], tools: dict[str, dict]) -> str:
    parts = [content] if isinstance(content, str) else [_part(p, tools) for p in content or []]
    text = BLOCK_SEPARATOR.join(p for p in parts if p is not None)
    # Chat messages have no error flag: the model learns of a failed tool from the text.
    return f"Error: {text}" if is_error else text


def _part(block, tools: dict[str, dict]) -> Optional[str]:
    if block.type == "text":
        return block.text
    if block.type == "tool_reference":  # the definition, as the tools section would list it
        return json.dumps(tools.get(block.tool_name, {"name": block.tool_name}), ensure_ascii=False)
    return None  # another model's reasoning: this one writes none
