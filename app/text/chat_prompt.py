"""Chat messages (OpenAI's shape, as plain dicts) and tools -> the prompt's token ids.

Every API translates its conversation into OpenAI chat messages first, so tools and tool
history render the same way everywhere. A model whose chat template has a tools section
(Qwen2.5, Llama 3.1) renders them itself; for one without (the embedded SmolLM2), Orchard
writes the Hermes-style section Qwen2.5 uses into the system message, assistant calls as
<tool_call> blocks and tool results as <tool_response> blocks, so tools work on every model.
"""
from __future__ import annotations

import json
from typing import Optional

from app.errors import bad_request

HERMES_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
HERMES_TOOLS_OUTRO = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>")


def check_tool_history(messages: list[dict]) -> None:
    """A tool message must answer a call an earlier assistant message made."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or []:
            called.add(call["id"])
        if message["role"] == "tool" and message.get("tool_call_id") not in called:
            raise bad_request(f"messages[{i}] is a tool message whose tool_call_id "
                              f"{message.get('tool_call_id')!r} answers no earlier assistant tool call",
                              param=f"messages.{i}.tool_call_id")


def render_prompt(text, messages: list[dict], tools: Optional[list[dict]]) -> list[int]:
    """Token ids of the conversation, ready for generation. `text` is the model's ModelText."""
    check_tool_history(messages)
    has_tool_history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if text.template_renders_tools:
        return text.encode_chat([_native(m) for m in messages], tools or None)
    if tools or has_tool_history:
        return text.encode_chat(_hermes(messages, tools or []))
    return text.encode_chat([_plain(m) for m in messages])


def _plain(message: dict) -> dict:
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": message.get("content") or ""}


def _native(message: dict) -> dict:
    """For templates with tools: arguments as objects (HF templates apply `tojson` to them)."""
    out = _plain(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
            for c in message["tool_calls"]]
    if message["role"] == "tool":
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _arguments(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # rendered as the model once wrote it


def _hermes(messages: list[dict], tools: list[dict]) -> list[dict]:
    out = [_plain(m) for m in messages]
    for rendered, message in zip(out, messages):
        if message.get("tool_calls"):
            blocks = "\n".join(f"<tool_call>\n{_call_json(c)}\n</tool_call>" for c in message["tool_calls"])
            rendered["content"] = (rendered["content"] + "\n" + blocks).lstrip("\n")
        if message["role"] == "tool":
            rendered.update(role="user", content=f"<tool_response>\n{rendered['content']}\n</tool_response>")
    if tools:
        section = "\n".join([HERMES_TOOLS_INTRO] + [json.dumps(t, ensure_ascii=False) for t in tools]
                            + [HERMES_TOOLS_OUTRO])
        if out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{section}"
        else:
            out.insert(0, {"role": "system", "content": section})
    return _merge_consecutive(out)


def _call_json(call: dict) -> str:
    fn = call["function"]
    return json.dumps({"name": fn["name"], "arguments": _arguments(fn["arguments"])}, ensure_ascii=False)


def _merge_consecutive(messages: list[dict]) -> list[dict]:
    """Tool results of parallel calls become one user turn (templates expect alternation)."""
    merged: list[dict] = []
    for m in messages:
        if merged and m["role"] == "user" and merged[-1]["role"] == "user" and "<tool_response>" in m["content"]:
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(m)
    return merged
