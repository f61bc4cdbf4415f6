"""Grammars for constrained decoding, as llguidance grammar strings (what `llguidance.LLMatcher`
takes). Pure string building: no MLX, no Flask; the engine (`engine.grammar`) compiles them.

- `json_object_grammar()`: response_format {"type": "json_object"}.
- `json_schema_grammar(schema, strict)`: response_format {"type": "json_schema", ...}.
- `tool_call_grammar(fmt, tools, parallel)`: a forced tool call (tool_choice "required" or a
  named function) in the model's own tool-call syntax.

JSON layout. Every JSON value is compact and deterministic: no whitespace except the
separators ", " between items and ": " after keys (llguidance's `x-guidance` options
`whitespace_flexible: false`, `item_separator`, `key_separator`). So a small or random model
cannot pad its answer with endless whitespace, and the text reads like `json.dumps` output.
A client's own `x-guidance` key is dropped: these options are the server's choice.

Schema support. llguidance's JSON-schema subset (anyOf, allOf, oneOf where provably disjoint,
local $ref, const, enum, type, properties (emitted in schema order), additionalProperties,
required, items, prefixItems, min/maxItems, min/maxLength, pattern, format, numeric bounds,
...). Unimplemented keywords are errors, never silently ignored (`lenient: false`):
`grammar_problem()` / `engine.grammar.grammar_error()` return a message naming them, e.g.
'Unimplemented keys: ["uniqueItems"]'.

strict (OpenAI's `strict` on a json_schema response format or a function):
- strict=False: the schema means what JSON Schema says: an object without
  `additionalProperties` accepts extra keys.
- strict=True: every object schema that lists `properties` (or `patternProperties`) and does
  not say `additionalProperties` gets `additionalProperties: false`, as OpenAI's strict mode
  requires (OpenAI rejects a strict schema without it; we fill it in). Object schemas without
  any listed properties (`{"type": "object"}`: a free-form object) are left open. `required`
  is taken as written in both modes (OpenAI strict wants every property listed there; we do
  not insist, so optional properties stay optional).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional

from llguidance import LLMatcher

__all__ = ["SchemaError", "JSON_OPTIONS", "json_object_grammar", "json_schema_grammar",
           "tool_call_grammar", "tool_call_text", "grammar_problem", "TOOL_CALL_FORMATS"]

# llguidance JSON compile options (x-guidance); applied as overrides, after the schema's own.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
    "coerce_one_of": False,
}

TOOL_CALL_FORMATS = ("hermes", "llama3_json")

# Keywords whose value is one subschema / a list of subschemas / a map of name -> subschema.
_SUB_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not",
            "if", "then", "else", "unevaluatedItems", "unevaluatedProperties")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class SchemaError(ValueError):
    """A schema or tool list that cannot become a grammar (the request's fault: answer 400)."""


def json_object_grammar() -> str:
    """Any JSON object, compact (see the module docstring)."""
    return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)


def json_schema_grammar(schema: dict, strict: bool) -> str:
    """A JSON value matching `schema`, compact. `strict`: see the module docstring.

    Raises SchemaError for what is visibly wrong (not a JSON object, not serialisable); the
    rest (unsupported keywords, bad $ref, bad regex) is reported by `grammar_problem()`."""
    prepared = _prepare(schema, strict, what="schema")
    try:
        return LLMatcher.grammar_from_json_schema(prepared, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise SchemaError(f"invalid schema: {e}") from e


def tool_call_grammar(fmt: str, tools: list[dict], parallel: bool) -> str:
    """The model's tool-call text for one of `tools`, or (if `parallel`) one or more calls.

    Each tool is {"name": str, "parameters": JSON schema or None, "strict": bool (optional,
    default False)}; a tool without parameters takes any JSON object. `fmt`:

    - "hermes" (Qwen2.5, Hermes): ``<tool_call>\\n{"name": "<name>", "arguments": <args>}\\n</tool_call>``;
      parallel calls are separated by "\\n".
    - "llama3_json": ``{"name": "<name>", "parameters": <args>}``; parallel calls separated by "; ".

    "name" comes first, then the arguments, which must match the schema of the tool named.
    The grammar ends after the last call: the model must then stop (EOS)."""
    if fmt not in TOOL_CALL_FORMATS:
        raise ValueError(f"unknown tool call format {fmt!r}; known: {', '.join(TOOL_CALL_FORMATS)}")
    if not isinstance(tools, (list, tuple)) or not tools:
        raise SchemaError("tool_call_grammar needs at least one tool")
    args_key = "arguments" if fmt == "hermes" else "parameters"
    rules, names = [], set()
    alternatives = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise SchemaError(f"tools[{i}] must be an object")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaError(f"tools[{i}].name must be a non-empty string")
        if name in names:
            raise SchemaError(f"duplicate tool name {name!r}")
        names.add(name)
        args = _tool_parameters(tool.get("parameters"), bool(tool.get("strict", False)), name)
        head = '{"name": ' + json.dumps(name) + ', "' + args_key + '": '
        rules.append(f"call_{i}: {_lark_str(head)} args_{i} {_lark_str('}')}")
        rules.append(f"args_{i}: %json {json.dumps(args, separators=(',', ':'))}")
        alternatives.append(f"call_{i}")
    if fmt == "hermes":
        top = [r'call: "<tool_call>\n" body "\n</tool_call>"', "body: " + " | ".join(alternatives)]
        sep = r'"\n"'
    else:
        top = ["call: " + " | ".join(alternatives)]
        sep = '"; "'
    start = f"start: call ({sep} call)*" if parallel else "start: call"
    return LLMatcher.grammar_from_lark("\n".join([start, *top, *rules]) + "\n")


def tool_call_text(fmt: str, name: str, arguments: Any) -> str:
    """How one call is written in `fmt`, compact (what the grammar produces): for tests and
    for rendering examples."""
    args = json.dumps(arguments, separators=(", ", ": "))
    if fmt == "hermes":
        return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": ' + args + "}\n</tool_call>"
    if fmt == "llama3_json":
        return '{"name": ' + json.dumps(name) + ', "parameters": ' + args + "}"
    raise ValueError(f"unknown tool call format {fmt!r}")


def grammar_problem(grammar: str) -> Optional[str]:
    """None if llguidance accepts `grammar`, else why (warnings count as errors). No tokenizer
    needed: usable in the web layer to answer 400 before the request reaches the engine."""
    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as e:  # noqa: BLE001 - malformed grammar text raises rather than reports
        return str(e) or type(e).__name__
    if messages:
        return "; ".join(m.strip() for m in messages)
    return "invalid grammar" if is_error else None


def _tool_parameters(parameters: Any, strict: bool, name: str) -> dict:
    if parameters is None or parameters == {}:
        return _with_options({"type": "object"})
    schema = _prepare(parameters, strict, what=f"parameters of tool {name!r}")
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise SchemaError(f"parameters of tool {name!r} must describe an object, not {kind!r}")
    schema["type"] = "object"  # arguments are always an object (a schema may say only properties)
    return _with_options(schema)


def _prepare(schema: Any, strict: bool, what: str) -> dict:
    if not isinstance(schema, dict):
        raise SchemaError(f"the {what} must be a JSON object, not {type(schema).__name__}")
    try:
        schema = json.loads(json.dumps(schema, allow_nan=False))  # a deep copy of plain JSON
        schema.pop("x-guidance", None)
        if strict:
            _close_objects(schema)
    except RecursionError as e:
        raise SchemaError(f"the {what} is nested too deeply") from e
    except (TypeError, ValueError) as e:
        raise SchemaError(f"the {what} is not plain JSON: {e}") from e
    return schema


def _with_options(schema: dict) -> dict:
    """A schema for a `%json` rule of a Lark grammar: it carries its own compile options."""
    return dict(schema, **{"x-guidance": JSON_OPTIONS})


def _close_objects(schema: Any) -> None:
    """strict: additionalProperties false where an object schema lists properties and is silent."""
    if isinstance(schema, list):  # e.g. draft-4 tuple `items`
        for sub in schema:
            _close_objects(sub)
        return
    if not isinstance(schema, dict):
        return
    if ("properties" in schema or "patternProperties" in schema) and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for key in _SUB_ONE:
        _close_objects(schema.get(key))
    for key in _SUB_LIST:
        for sub in _as_list(schema.get(key)):
            _close_objects(sub)
    for key in _SUB_MAP:
        sub = schema.get(key)
        if isinstance(sub, dict):
            for value in sub.values():
                _close_objects(value)


def _as_list(value: Any) -> Iterable:
    return value if isinstance(value, list) else ()


def _lark_str(text: str) -> str:
    """A Lark string literal matching exactly `text` (llguidance reads JSON string escapes)."""
    return json.dumps(text)
