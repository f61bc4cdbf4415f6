"""Request models of Anthropic's Messages API, validated strictly, and their translation into the
neutral terms the generation core takes: OpenAI-shaped chat messages (what render_prompt reads),
an OutputSpec (what Constraints plans from) and SamplingParams.

Fields Anthropic documents that mean nothing here are accepted and ignored: `thinking` (this
model does not think aloud), `service_tier`, `metadata`, and `cache_control` on blocks and tools
(Orchard's prefix cache needs no breakpoints).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import bad_request
from app.generation.constraints import OutputSpec
from engine.sampling import SamplingParams

MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 16  # each is searched for after every token; Anthropic names no limit
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,128}$"
BLOCK_SEPARATOR = "\n\n"  # between text blocks of one turn: clients split paragraphs into blocks
Hint = Optional[dict[str, Any]]  # cache_control: accepted, ignored


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: Hint = None
    citations: Optional[list[dict[str, Any]]] = None  # echoed back by clients; ignored


class OtherBlock(BaseModel):
    """Images and documents, parsed so the answer can say this model reads text only (not a schema
    error); another model's reasoning echoed back in a history, dropped (this one writes none)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "thinking", "redacted_thinking"]

    @property
    def media(self) -> bool:
        return self.type in ("image", "document")


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    input: dict[str, Any]
    cache_control: Hint = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: Union[str, list[Annotated[Union[TextBlock, OtherBlock], Field(discriminator="type")]], None] = None
    is_error: Optional[bool] = None
    cache_control: Hint = None


Block = Annotated[Union[TextBlock, OtherBlock, ToolUseBlock, ToolResultBlock],
                  Field(discriminator="type")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]

    def blocks(self) -> list:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(_Strict):
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None
    cache_control: Hint = None

    @model_validator(mode="before")
    @classmethod
    def _no_server_tools(cls, data):
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"server tools ({kind!r}) are not supported: this server runs only tools the "
                             f"client executes, given with a name and an input_schema")
        return data


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None

    @model_validator(mode="after")
    def _name_with_tool(self):
        if (self.name is None) == (self.type == "tool"):
            raise ValueError("tool_choice names a tool with type 'tool', and only then")
        return self


class Metadata(_Strict):
    user_id: Optional[Annotated[str, Field(max_length=256)]] = None


class CountTokensRequest(_Strict):
    """The conversation part of a request: all count_tokens takes, and what renders the prompt."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[Annotated[list[Tool], Field(max_length=MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[dict[str, Any]] = None
    cache_control: Hint = None  # automatic prompt caching: the prefix cache always runs

    @model_validator(mode="after")
    def _choice_needs_tools(self):
        if self.tool_choice and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice.type!r} needs tools")
        return self

    def chat_messages(self) -> list[dict]:
        """The conversation as OpenAI-shaped chat messages (app/text/chat_prompt.py's input)."""
        out = [{"role": "system", "content": _joined(self.system)}] if self.system else []
        called: set[str] = set()  # tool_use ids of the assistant turn right before
        for i, message in enumerate(self.messages):
            blocks = message.blocks()
            _refuse_media(blocks, i)
            if message.role == "assistant":
                out.append(_assistant(blocks, i))
                called = {c["id"] for c in out[-1].get("tool_calls", [])}
            else:
                out.extend(_user(blocks, i, called))
                called = set()
        return out

    def tool_definitions(self) -> Optional[list[dict]]:
        """Tools in the chat templates' shape; none rendered with tool_choice none."""
        if not self.tools or (self.tool_choice and self.tool_choice.type == "none"):
            return None
        return [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                  **({"description": t.description} if t.description else {})}}
                for t in self.tools]

    def output_spec(self) -> OutputSpec:
        choice = self.tool_choice
        kind = choice.type if choice else "auto"
        return OutputSpec(tools=[{"name": t.name, "parameters": t.input_schema} for t in self.tools or []],
                          tool_choice={"any": "required", "tool": "named"}.get(kind, kind),
                          tool_name=choice.name if choice else None,
                          parallel=not (choice and choice.disable_parallel_tool_use),
                          tool_params=tuple(f"tools.{i}.input_schema" for i in range(len(self.tools or []))))


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Optional[Annotated[list[Annotated[str, Field(min_length=1)]],
                                       Field(max_length=MAX_STOP_SEQUENCES)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Field(ge=0, le=1_000_000)]] = None
    stream: Optional[bool] = False
    metadata: Optional[Metadata] = None
    service_tier: Optional[Literal["auto", "standard_only"]] = None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0)


def _joined(content: Union[str, list[TextBlock]]) -> str:
    return content if isinstance(content, str) else BLOCK_SEPARATOR.join(b.text for b in content)


def _refuse_media(blocks: list, i: int) -> None:
    for j, block in enumerate(blocks):
        inner = block.content if isinstance(block, ToolResultBlock) and isinstance(block.content, list) else []
        for part in [block, *inner]:
            if isinstance(part, OtherBlock) and part.media:
                raise bad_request(f"messages[{i}].content[{j}] has an '{part.type}' block, but this model reads "
                                  f"text only", param=f"messages.{i}.content.{j}", code="unsupported_content")


def _misplaced(i: int, j: int, kind: str, role: str) -> Exception:
    return bad_request(f"messages[{i}].content[{j}]: a {kind} block belongs in {role} message",
                       param=f"messages.{i}.content.{j}")


def _assistant(blocks: list, i: int) -> dict:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlock):
            raise _misplaced(i, j, "tool_result", "a user")
    out: dict = {"role": "assistant", "content": BLOCK_SEPARATOR.join(texts)}
    if calls:
        out["tool_calls"] = calls
    return out


def _user(blocks: list, i: int, called: set[str]) -> list[dict]:
    """Tool results become `tool` messages right after the assistant turn that called them (chat
    templates expect that order); the turn's text follows as a user message."""
    results, texts = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            if block.tool_use_id not in called:
                raise bad_request(f"messages[{i}].content[{j}] answers tool_use id {block.tool_use_id!r}, which "
                                  f"the assistant message right before did not call",
                                  param=f"messages.{i}.content.{j}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block)})
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            raise _misplaced(i, j, "tool_use", "an assistant")
    if texts or not results:
        results.append({"role": "user", "content": BLOCK_SEPARATOR.join(texts)})
    return results


def _result_text(block: ToolResultBlock) -> str:
    text = _joined(block.content) if block.content is not None else ""
    # Chat messages have no error flag: the model learns of a failed tool from the text.
    return f"Error: {text}" if block.is_error else text
