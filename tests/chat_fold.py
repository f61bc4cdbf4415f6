"""Every chat behaviour is tested streamed and not: `ask` returns the non-stream shape either
way, folding a stream chunk by chunk and checking the invariants every chunk must keep."""
from __future__ import annotations

TAGS = ("<tool_call>", "</tool_call>")


def ask(client, stream: bool, **kwargs) -> dict:
    """The chat.completion body as a dict, from a plain call or a folded stream."""
    if not stream:
        return client.chat.completions.create(**kwargs).model_dump()
    chunks = [c.model_dump() for c in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs)]
    return fold(chunks)


def fold(chunks: list[dict]) -> dict:
    assert len({c["id"] for c in chunks}) == 1, "one id for the whole stream"
    choices: dict[int, dict] = {}
    usage = None
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        for c in chunk["choices"]:
            _fold_choice(choices.setdefault(c["index"], _empty()), c)
    assert usage is not None, "include_usage ends the stream with a usage chunk"
    out = []
    for index in sorted(choices):
        state = choices[index]
        assert state["finish_reason"] is not None, f"choice {index} never finished"
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in state["calls"]]
        text = "".join(state["content"])
        out.append({"index": index, "finish_reason": state["finish_reason"],
                    "message": {"role": "assistant", "content": text if text or not calls else None,
                                "tool_calls": calls or None},
                    "logprobs": {"content": state["logprobs"]} if state["logprobs"] else None,
                    "fragments": state["fragments"]})
    return {"choices": out, "usage": usage, "streamed": True}


def _empty() -> dict:
    return {"role_seen": False, "content": [], "calls": [], "finish_reason": None, "logprobs": [],
            "fragments": {}}


def _fold_choice(state: dict, c: dict) -> None:
    assert state["finish_reason"] is None, "nothing follows a choice's finish_reason"
    delta = c["delta"]
    if delta.get("role"):
        assert not state["role_seen"], "role comes once, first"
        state["role_seen"] = True
    assert state["role_seen"], "the first chunk of a choice carries the role"
    if delta.get("content"):
        assert not any(tag in delta["content"] for tag in TAGS), "tool markup leaked into content"
        state["content"].append(delta["content"])
    for call in delta.get("tool_calls") or []:
        calls = state["calls"]
        if call.get("id"):
            assert call["index"] == len(calls), "a new call takes the next index"
            assert call["function"]["name"], "name comes with the id"
            calls.append({"id": call["id"], "name": call["function"]["name"], "arguments": ""})
        else:
            assert call["index"] == len(calls) - 1, "argument pieces belong to the newest call"
            assert not call["function"].get("name"), "the name is sent once"
        piece = call["function"].get("arguments") or ""
        calls[call["index"]]["arguments"] += piece
        if piece:
            state["fragments"][call["index"]] = state["fragments"].get(call["index"], 0) + 1
    if c.get("logprobs") and c["logprobs"].get("content"):
        state["logprobs"].extend(c["logprobs"]["content"])
    state["finish_reason"] = c.get("finish_reason")
