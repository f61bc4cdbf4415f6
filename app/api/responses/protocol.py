"""The request of OpenAI's Responses API, validated strictly, and its translation into the chat
messages and OutputSpec every API edge shares.

Honoured: model, input (a string, or message / function_call / function_call_output items),
instructions, function tools, namespace tools, tool_choice, parallel_tool_calls, text.format
(text, json_object, json_schema), max_output_tokens, temperature, top_p, stream, store,
previous_response_id, metadata.

A namespace tool ({"type": "namespace", "name", "description", "tools": [function tools]}: how
Codex CLI sends its sub-agent tools) offers its functions to the model as "<namespace>.<name>"
(function names have no dots, so these never clash with them); a call of one comes back as a
function_call item with that `namespace` and the plain `name`, which is how clients route it
(Codex answers "unsupported call" otherwise), and comes back as input in that shape too.

max_output_tokens is a cap: when the context or MAX_TOKENS_LIMIT leaves less, generation stops
there and the response is incomplete (serving.output_cap).

Accepted and ignored (they mean nothing on a local server): reasoning (Codex: {"summary":
"auto"}), include (Codex: ["reasoning.encrypted_content"]; no reasoning items are ever made),
service_tier, user, prompt_cache_key (the prefix cache needs no key), client_metadata (Codex's
ids), safety_identifier, stream_options, text.verbosity, a namespace's description, a function's
defer_loading (nothing here loads tools later, so every function is offered), truncation
("disabled" only: nothing is ever truncated). Tools of any other type (web_search,
web_search_preview, file_search, computer_use_preview, code_interpreter, image_generation, mcp,
local_shell, shell, custom, apply_patch, tool_search, ...) are hosted by OpenAI: they are
dropped, never rendered, never echoed. Input images, files and audio in messages are 400s: the
model reads text only; in a function_call_output (Codex's view_image) they become a line that
says so, since a 400 there would end the agent's session for good.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from app.errors import bad_request
from app.generation.constraints import OutputSpec
from engine.sampling import SamplingParams

MAX_TOOLS = 128
MAX_ITEMS = 4096
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
CallId = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _by_type(known: tuple[str, ...], default: Optional[str] = None, other: Optional[str] = None):
    """Picks a union's member by "type" (absent: `default`). Members are tagged with their type in
    CamelCase, which error paths leave out (app.errors). A type outside `known` picks `other`, or
    none (the union's own error)."""
    def pick(value):
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        if kind in known:
            return "".join(word.capitalize() for word in kind.split("_"))
        return other
    return pick


def _shape(value) -> str:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else "Object"


def _string_or(string: Any, other: Any, what: str, tag: str = "list") -> Any:
    """A string-or-`other` field: a wrong value gets one error (not one per branch) that says what fits."""
    return Annotated[Union[Annotated[string, Tag("str")], Annotated[other, Tag(tag)]],
                     Discriminator(_shape, custom_error_type="invalid_type",
                                   custom_error_message=f"Input should be a string or {what}")]


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """Also what clients send back when they replay a response's output as input."""
    type: Literal["output_text"]
    text: str
    annotations: Optional[list[Any]] = None
    logprobs: Optional[list[Any]] = None


class MediaPart(BaseModel):
    """Parsed only so the answer can say this model reads text only."""
    model_config = ConfigDict(extra="allow")
    type: Literal["input_image", "input_file", "input_audio"]


Part = Annotated[Union[Annotated[InputText, Tag("InputText")], Annotated[OutputText, Tag("OutputText")],
                       Annotated[MediaPart, Tag("Media")]],
                 Discriminator(_by_type(("input_text", "output_text"), other="Media"))]
Parts = Annotated[list[Part], Field(min_length=1)]
Content = _string_or(str, Parts, "a list of content parts")


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: Optional[str] = None  # a replayed output item's
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None
    phase: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if not isinstance(p, MediaPart))

    def media(self) -> Optional[str]:
        parts = [] if isinstance(self.content, str) else self.content
        return next((p.type for p in parts if isinstance(p, MediaPart)), None)


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: CallId
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str
    namespace: Optional[Annotated[str, Field(min_length=1, max_length=64)]] = None  # a namespace tool's call
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


OutputPart = Annotated[Union[Annotated[InputText, Tag("InputText")], Annotated[MediaPart, Tag("Media")]],
                       Discriminator(_by_type(("input_text",), other="Media"))]
CallOutput = _string_or(str, Annotated[list[OutputPart], Field(min_length=1)], "a list of content parts")


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: CallId
    output: CallOutput
    id: Optional[str] = None
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(f"[{p.type} omitted: this model reads text only]" if isinstance(p, MediaPart) else p.text
                       for p in self.output)


Item = Annotated[Union[Annotated[MessageItem, Tag("Message")], Annotated[FunctionCallItem, Tag("FunctionCall")],
                       Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]],
                 Discriminator(_by_type(("message", "function_call", "function_call_output"), default="message"), custom_error_type="invalid_item",
                               custom_error_message="input items are message, function_call or "
                                                    "function_call_output")]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None  # None means True: the Responses API's default, unlike chat's
    defer_loading: Optional[bool] = None  # ignored: see the module docstring

    def echo(self) -> dict:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict is not False}


class HostedTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


NamespaceMember = Annotated[Union[Annotated[FunctionTool, Tag("Function")], Annotated[HostedTool, Tag("Hosted")]],
                            Discriminator(_by_type(("function",), other="Hosted"))]


class NamespaceTool(_Strict):
    """A group of tools whose functions are offered under qualified names (see the module
    docstring); its other tools (OpenAI allows custom ones) are dropped like hosted tools."""
    type: Literal["namespace"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: Optional[str] = None
    tools: Annotated[list[NamespaceMember], Field(min_length=1, max_length=MAX_TOOLS)]

    def functions(self) -> list[tuple[int, FunctionTool]]:
        return [(j, t) for j, t in enumerate(self.tools) if isinstance(t, FunctionTool)]

    def echo(self) -> dict:
        return {"type": "namespace", "name": self.name, "description": self.description,
                "tools": [t.echo() for _, t in self.functions()]}


def qualified(namespace: Optional[str], name: str) -> str:
    """A function's name as the model sees it."""
    return f"{namespace}.{name}" if namespace else name


@dataclass(frozen=True)
class Offered:
    """A function the model is offered: a top-level one or one of a namespace's."""
    name: str  # as the model sees and calls it
    tool: FunctionTool
    namespace: Optional[str]
    param: str  # where its parameters sit in the request, for 400s


class NamedFunction(_Strict):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[Annotated[str, Field(pattern=FUNCTION_NAME)]] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    @model_validator(mode="after")
    def _schema_when_asked(self):
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("type 'json_schema' needs a name and a schema")
        if self.type != "json_schema" and (self.schema_ is not None or self.strict is not None):
            raise ValueError("schema and strict apply to type 'json_schema' only")
        return self


class TextConfig(_Strict):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None  # ignored


Input = _string_or(str, Annotated[list[Item], Field(min_length=1, max_length=MAX_ITEMS)], "a list of items")
ToolChoice = _string_or(Literal["none", "auto", "required"], NamedFunction, '{"type": "function", "name": ...}',
                        "Object")


class ResponsesRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Input
    instructions: Optional[str] = None
    tools: Optional[Annotated[list[Annotated[
        Union[Annotated[FunctionTool, Tag("Function")], Annotated[NamespaceTool, Tag("Namespace")],
              Annotated[HostedTool, Tag("Hosted")]],
        Discriminator(_by_type(("function", "namespace"), other="Hosted"))]], Field(max_length=MAX_TOOLS)]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    max_output_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    stream: Optional[bool] = False
    store: Optional[bool] = None
    previous_response_id: Optional[Annotated[str, Field(min_length=1, max_length=256)]] = None
    metadata: Optional[Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)]] = None
    truncation: Optional[Literal["disabled"]] = None
    # Accepted and ignored (see the module docstring).
    user: Optional[Annotated[str, Field(max_length=256)]] = None
    reasoning: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    service_tier: Optional[Literal["auto", "default", "flex", "scale", "priority"]] = None
    prompt_cache_key: Optional[Annotated[str, Field(max_length=256)]] = None
    safety_identifier: Optional[Annotated[str, Field(max_length=256)]] = None
    stream_options: Optional[dict[str, Any]] = None
    client_metadata: Optional[dict[str, Any]] = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, value, info):
        tools = [t for t in info.data.get("tools") or []
                 if isinstance(t, FunctionTool) or isinstance(t, NamespaceTool) and t.functions()]
        if value not in (None, "none", "auto") and not tools:
            raise ValueError("tool_choice 'required' or a named function needs function tools")
        return value

    def offered(self) -> list[Offered]:
        """Every function the model is offered, a namespace's included, in request order."""
        out: list[Offered] = []
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, FunctionTool):
                out.append(Offered(tool.name, tool, None, f"tools.{i}.parameters"))
            elif isinstance(tool, NamespaceTool):
                out += [Offered(qualified(tool.name, t.name), t, tool.name, f"tools.{i}.tools.{j}.parameters")
                        for j, t in tool.functions()]
        return out

    def namespaced(self) -> dict[str, tuple[str, str]]:
        """The model's name of each namespace function -> (namespace, name), as its calls go out."""
        return {o.name: (o.namespace, o.tool.name) for o in self.offered() if o.namespace}

    def echoed_tools(self) -> list[dict]:
        return [t.echo() for t in self.tools or [] if isinstance(t, (FunctionTool, NamespaceTool))]

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p)

    def output_spec(self) -> OutputSpec:
        """Tools and text.format in neutral terms."""
        named = self.tool_choice if isinstance(self.tool_choice, NamedFunction) else None
        fmt = self.text.format if self.text else None
        json_mode = {"json_object": "object", "json_schema": "schema"}.get(fmt.type) if fmt else None
        offered = self.offered()
        return OutputSpec(
            tools=[{"name": o.name, "parameters": o.tool.parameters, "strict": o.tool.strict is not False}
                   for o in offered],
            tool_choice="named" if named else (self.tool_choice or "auto"), tool_name=named.name if named else None,
            parallel=self.parallel_tool_calls is not False, json_mode=json_mode,
            schema=fmt.schema_ if json_mode == "schema" else None, strict=bool(fmt and fmt.strict),
            tools_param="tools", format_param="text.format", schema_param="text.format.schema",
            tool_params=tuple(o.param for o in offered))


def input_messages(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    """This request's input as chat messages (instructions aside); `history` is the conversation
    of previous_response_id, whose calls a function_call_output may answer."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    called = {c["id"] for m in history for c in m.get("tool_calls") or []}
    out: list[dict] = []
    for i, item in enumerate(body.input):
        if isinstance(item, FunctionCallItem):
            called.add(item.call_id)
            _add_call(out, {"id": item.call_id, "type": "function",
                            "function": {"name": qualified(item.namespace, item.name), "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise bad_request(f"input[{i}] is a function_call_output whose call_id {item.call_id!r} answers "
                                  f"no earlier function_call", param=f"input.{i}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        else:
            if item.media():
                raise bad_request(f"input[{i}] has an '{item.media()}' part, but this model reads text only",
                                  param=f"input.{i}.content", code="unsupported_content")
            out.append({"role": item.role, "content": item.text()})
    return out


def _add_call(messages: list[dict], call: dict) -> None:
    """Calls right after an assistant message (or after other calls) belong to that turn."""
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the assistant turn the next response continues."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": qualified(item.get("namespace"), item["name"]), "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]


def tool_definitions(body: ResponsesRequest) -> list[dict]:
    """Offered functions in the shape chat templates expect ({"type": "function", "function": {...}})."""
    return [{"type": "function", "function": {"name": o.name, **o.tool.model_dump(
        include={"description", "parameters"}, exclude_none=True)}} for o in body.offered()]
