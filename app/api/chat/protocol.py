"""Request models of OpenAI's chat completions, validated strictly (wrong types are errors, not coerced).

Each request converts itself into engine parameters; nothing else reads raw JSON. Fields the
API documents but that mean nothing on a local server (store, metadata, service_tier,
prediction, user, ...) are accepted and ignored; README_PRODUCTION lists them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.sampling_fields import SamplingFields, StrictModel

MAX_TOOLS = 128
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


_Strict = StrictModel


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image, audio or file part: accepted by the parser so the answer can name the
    problem (this model reads text only) instead of a schema error."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


ContentParts = Annotated[list[Union[TextPart, MediaPart]], Field(min_length=1)]


class FunctionCall(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str


class ToolCall(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    # The OpenAPI document states what the validator below enforces.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"role": {"const": "assistant"}}},
        "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}})

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, ContentParts, None] = None
    name: Optional[Annotated[str, Field(max_length=256)]] = None
    tool_calls: Optional[Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)]] = None  # assistant
    tool_call_id: Optional[Annotated[str, Field(min_length=1, max_length=256)]] = None  # tool
    refusal: Optional[str] = None  # assistant; ignored

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self

    def media(self) -> Optional[str]:
        """The type of the first non-text part, if any."""
        if isinstance(self.content, list):
            return next((p.type for p in self.content if isinstance(p, MediaPart)), None)
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_when_asked(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class ChatCompletionRequest(SamplingFields):
    # The OpenAPI document states what _options_need_stream enforces.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
        "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}})

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[Annotated[list[Tool], Field(max_length=MAX_TOOLS)]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # Accepted and ignored: meaningless on a local server (listed in README_PRODUCTION).
    user: Optional[Annotated[str, Field(max_length=256)]] = None
    store: Optional[bool] = None
    metadata: Optional[Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]] = None
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    prediction: Optional[dict[str, Any]] = None
    modalities: Optional[list[Literal["text"]]] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None
    prompt_cache_key: Optional[Annotated[str, Field(max_length=256)]] = None
    safety_identifier: Optional[Annotated[str, Field(max_length=256)]] = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs set to true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, value, info):
        if value not in (None, "none", "auto") and not info.data.get("tools"):
            raise ValueError("tool_choice 'required' or a named function needs tools")
        return value

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


    @property
    def logprobs_k(self) -> Optional[int]:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_definitions(self) -> list[dict]:
        """Tools in the shape chat templates expect ({"type": "function", "function": {...}})."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]
