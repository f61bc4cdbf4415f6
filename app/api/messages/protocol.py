"""Request models of Anthropic's Messages API, validated strictly, and their translation into the
neutral terms the generation core takes: OpenAI-shaped chat messages (conversation.py, what
render_prompt reads), an OutputSpec (what Constraints plans from) and SamplingParams.

Unknown fields are 400s. Every field Claude Code (2.1.x) sends is accepted; the ones that mean
something are honoured: `system` messages inside `messages` and their `clear_at`, tools'
`defer_loading` with `tool_reference` results (conversation.py), `output_config.format` (a JSON
schema the answer must match), and `max_tokens` as a cap (serving.py). Accepted and ignored:
- `thinking` (any shape: enabled/disabled/adaptive, budget_tokens, display): this model does not
  think aloud;
- `output_config.effort`, top-level and per message: one model, one way of answering;
- `context_management` (e.g. clear_thinking, clear_tool_uses edits): there is no thinking to
  clear, and the whole conversation sent is the context;
- `metadata` (Claude Code's user_id is a JSON string of device and session ids), `service_tier`;
- `cache_control` on the request, blocks and tools: Orchard's prefix cache needs no breakpoints;
- tools' `strict` (forced calls always match their schema; free ones are parsed as written),
  `eager_input_streaming` (arguments always stream) and `input_examples`;
- the `anthropic-beta` and `anthropic-version` headers and the `?beta=true` query (route.py).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.messages import conversation
from app.generation.constraints import OutputSpec
from engine.sampling import SamplingParams

MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 16  # each is searched for after every token; Anthropic names no limit
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,128}$"
Hint = Optional[dict[str, Any]]  # cache_control: accepted, ignored
Effort = Optional[Annotated[str, Field(max_length=32)]]  # low ... max, xhigh: accepted, ignored


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


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    input: dict[str, Any]
    cache_control: Hint = None


class ToolReferenceBlock(_Strict):
    """ToolSearch's answer in a tool result: the named (deferred) tool is now loaded."""

    type: Literal["tool_reference"]
    tool_name: Annotated[str, Field(pattern=TOOL_NAME)]
    cache_control: Hint = None


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: Union[str, list[Annotated[Union[TextBlock, OtherBlock, ToolReferenceBlock],
                                       Field(discriminator="type")]], None] = None
    is_error: Optional[bool] = None
    cache_control: Hint = None


Block = Annotated[Union[TextBlock, OtherBlock, ToolUseBlock, ToolResultBlock],
                  Field(discriminator="type")]


class TurnConfig(_Strict):
    effort: Effort = None


class Message(_Strict):
    role: Literal["user", "assistant", "system"]  # system: Claude Code's per-turn-control beta
    content: Union[str, list[Block]]
    clear_at: Optional[Literal["next_user_message"]] = None  # system messages only
    output_config: Optional[TurnConfig] = None

    @model_validator(mode="after")
    def _clear_at_on_system(self):
        if self.clear_at and self.role != "system":
            raise ValueError("clear_at is only permitted on system messages")
        return self

    def blocks(self) -> list:
        return [TextBlock(type="text", text=self.content)] if isinstance(self.content, str) else self.content


class Tool(_Strict):
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[Literal["custom"]] = None
    cache_control: Hint = None
    defer_loading: Optional[bool] = None  # listed only once a tool_reference loads it
    strict: Optional[bool] = None
    eager_input_streaming: Optional[bool] = None
    input_examples: Optional[list[dict[str, Any]]] = None

    def definition(self) -> dict:
        """The tool in the chat templates' shape."""
        return {"type": "function", "function": {"name": self.name, "parameters": self.input_schema,
                                                 **({"description": self.description} if self.description else {})}}

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


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Effort = None
    format: Optional[OutputFormat] = None  # structured outputs: the answer matches this schema


class CountTokensRequest(_Strict):
    """The conversation part of a request: all count_tokens takes, and what renders the prompt."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    system: Union[str, list[TextBlock], None] = None
    tools: Optional[Annotated[list[Tool], Field(max_length=MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[dict[str, Any]] = None
    cache_control: Hint = None  # automatic prompt caching: the prefix cache always runs
    output_config: Optional[OutputConfig] = None
    context_management: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _choice_needs_tools(self):
        if self.tool_choice and self.tool_choice.type in ("any", "tool") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice.type!r} needs tools")
        return self

    def chat_messages(self) -> list[dict]:
        """The conversation as OpenAI-shaped chat messages (app/text/chat_prompt.py's input)."""
        tools = {t.name: t.definition() for t in self.tools or []}
        return conversation.chat_messages(self.system, self.messages, tools)

    def tool_definitions(self) -> Optional[list[dict]]:
        """The tools section: none with tool_choice none; deferred tools only where referenced."""
        if self.tool_choice and self.tool_choice.type == "none":
            return None
        return [t.definition() for t in self.tools or [] if not t.defer_loading] or None

    def output_spec(self) -> OutputSpec:
        choice = self.tool_choice
        kind = choice.type if choice else "auto"
        fmt = self.output_config.format if self.output_config else None
        return OutputSpec(tools=[{"name": t.name, "parameters": t.input_schema} for t in self.tools or []],
                          tool_choice={"any": "required", "tool": "named"}.get(kind, kind),
                          tool_name=choice.name if choice else None,
                          parallel=not (choice and choice.disable_parallel_tool_use),
                          tool_params=tuple(f"tools.{i}.input_schema" for i in range(len(self.tools or []))),
                          json_mode="schema" if fmt else None, schema=fmt.json_schema if fmt else None,
                          strict=True, format_param="output_config.format",
                          schema_param="output_config.format.schema")


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
