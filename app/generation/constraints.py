"""What a request constrains its output to, decided before the engine sees it: which tool-call
format to parse, and the one grammar (if any) every choice must match.

TGI's idea: tool_choice "required" or a named function, and response_format json_object /
json_schema, all become one llguidance grammar on the same path. `auto` leaves the model free
and parses what it writes. Every schema is compiled here first, so a schema the grammar
engine cannot honour is a 400 that names the problem, never an engine failure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from app.errors import bad_request
from app.generation import grammars
from app.text.tool_parsers import get_parser

MAX_SCHEMA_BYTES = 64 * 1024  # one tool's parameters or one response schema, as compact JSON


@dataclass(frozen=True)
class OutputSpec:
    """An API's output options in neutral terms (each API edge fills one)."""

    tools: list[dict] = field(default_factory=list)  # [{"name": str, "parameters": dict | None}]
    tool_choice: str = "auto"  # "auto" | "required" | "none" | "named"
    tool_name: Optional[str] = None  # with "named"
    parallel: bool = True
    json_mode: Optional[str] = None  # None | "object" | "schema"
    schema: Optional[dict] = None
    strict: bool = False
    # Where each thing sits in the API's own request, so a 400 names the client's path.
    tools_param: str = "tools"
    tool_params: tuple[str, ...] = ()  # each tool's schema; default "<tools_param>.<i>.function.parameters"
    format_param: str = "response_format"
    schema_param: Optional[str] = None  # default "<format_param>.json_schema.schema"


@dataclass(frozen=True)
class Plan:
    grammar: Optional[str] = None
    parser: Optional[type] = None  # a ToolParser class when tool calls are parsed
    parallel: bool = True


class Constraints:
    def __init__(self, text, parser_setting: str):
        self._text = text  # app.model_text.ModelText
        self._parser_name = parser_setting if parser_setting != "auto" else _parser_for(text.template_source)

    @property
    def parser_name(self) -> str:
        return self._parser_name

    def plan(self, spec: OutputSpec) -> Plan:
        for i, tool in enumerate(spec.tools):
            if tool.get("parameters") is not None:
                param = spec.tool_params[i] if spec.tool_params else f"{spec.tools_param}.{i}.function.parameters"
                self._check_schema(tool["parameters"], param)
        parser = get_parser(self._parser_name) if spec.tools and spec.tool_choice != "none" else None
        if spec.tool_choice in ("required", "named"):
            chosen = spec.tools
            if spec.tool_choice == "named":
                chosen = [t for t in spec.tools if t["name"] == spec.tool_name]
                if not chosen:
                    raise bad_request(f"tool_choice names the function {spec.tool_name!r}, which is not among the "
                                      f"tools", param="tool_choice")
            # A named function is one call of that function; "required" may call several when parallel.
            parallel = spec.parallel and spec.tool_choice == "required"
            grammar = _build(grammars.tool_call_grammar, spec.tools_param, self._parser_name, chosen, parallel)
            return Plan(self._checked(grammar, spec.tools_param), parser, parallel)
        if spec.json_mode == "object":
            return Plan(self._checked(grammars.json_object_grammar(), spec.format_param), parser, spec.parallel)
        if spec.json_mode == "schema":
            param = spec.schema_param or f"{spec.format_param}.json_schema.schema"
            self._check_schema(spec.schema or {}, param)
            grammar = _build(grammars.json_schema_grammar, param, spec.schema or {}, spec.strict)
            return Plan(self._checked(grammar, param), parser, spec.parallel)
        return Plan(None, parser, spec.parallel)

    def _check_schema(self, schema: dict, param: str) -> None:
        raw = json.dumps(schema, separators=(",", ":"), sort_keys=True)
        if len(raw) > MAX_SCHEMA_BYTES:
            raise bad_request(f"The JSON schema at {param} is {len(raw)} bytes; this server accepts schemas up to "
                              f"{MAX_SCHEMA_BYTES} bytes", param=param, code="schema_too_large")
        problem = _schema_problem(raw, self._text.grammar_tokenizer)
        if problem:
            raise bad_request(f"The JSON schema at {param} cannot be used: {problem}", param=param,
                              code="invalid_schema")

    def _checked(self, grammar: str, param: str) -> str:
        if self._text.grammar_tokenizer is None:
            raise bad_request("This model's tokenizer does not support grammar-constrained output", param=param)
        problem = _grammar_problem(grammar, self._text.grammar_tokenizer)
        if problem:
            raise bad_request(f"This output constraint cannot be used: {problem}", param=param,
                              code="invalid_schema")
        return grammar


def _build(builder, param: str, *args) -> str:
    try:
        return builder(*args)
    except Exception as exc:
        raise bad_request(f"The JSON schema at {param} cannot be used: {exc}", param=param,
                          code="invalid_schema") from None


@lru_cache(maxsize=256)
def _schema_problem(raw_schema: str, tokenizer) -> Optional[str]:
    """Compiled once per distinct schema: agents send the same tools on every turn."""
    try:
        grammar = grammars.json_schema_grammar(json.loads(raw_schema), False)
    except Exception as exc:  # SchemaError, or whatever the grammar library says of this schema
        return str(exc) or exc.__class__.__name__
    return _grammar_problem(grammar, tokenizer) if tokenizer is not None else None


@lru_cache(maxsize=256)
def _grammar_problem(grammar: str, tokenizer) -> Optional[str]:
    from engine.grammar import grammar_error

    try:
        return grammar_error(grammar, tokenizer)
    except Exception as exc:  # never a 500 for a client's schema
        return str(exc) or exc.__class__.__name__


def _parser_for(template: str) -> str:
    """Llama 3.x templates speak JSON tool calls; everything else (Qwen2.5, Hermes, Orchard's
    own section for templates without one) speaks <tool_call> blocks."""
    return "llama3_json" if "<|start_header_id|>" in template and "<|python_tag|>" in template else "hermes"
