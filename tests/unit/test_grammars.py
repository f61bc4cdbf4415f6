"""Grammar strings (app.generation.grammars) checked with llguidance against the tiny test
model's tokenizer (engine.random_model: a byte-level BPE with Qwen2.5's non-special
<tool_call> added tokens). No model, no MLX: token-by-token acceptance and rejection only."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app.generation import grammars
from app.generation.grammars import (SchemaError, json_object_grammar, json_schema_grammar, tool_call_grammar,
                                     tool_call_text)
from engine.grammar import build_grammar_tokenizer, grammar_error
from engine.random_model import SPECIAL_TOKENS, TOOL_CALL_TOKENS

EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    import transformers

    from engine.random_model import _write_tokenizer

    path = tmp_path_factory.mktemp("tok")
    _write_tokenizer(path, 512)
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def lt(hf_tok):
    return build_grammar_tokenizer(hf_tok, [EOS])


@pytest.fixture(scope="module")
def tool_ids(hf_tok):
    return hf_tok.convert_tokens_to_ids(TOOL_CALL_TOKENS)


def matcher(lt, grammar):
    from llguidance import LLMatcher

    m = LLMatcher(lt, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def feed(lt, hf_tok, grammar, text=None, ids=None):
    """(consumed all?, accepting at the end?, error) after feeding `text` (or `ids`) one token at a time."""
    m = matcher(lt, grammar)
    ids = hf_tok.encode(text, add_special_tokens=False) if ids is None else ids
    for t in ids:
        if not m.consume_token(t):
            return False, False, m.get_error()
    return True, m.is_accepting(), ""


def accepts(lt, hf_tok, grammar, text=None, ids=None) -> bool:
    ok, accepting, _ = feed(lt, hf_tok, grammar, text, ids)
    return ok and accepting


def allowed(lt, m) -> set[int]:
    words = np.zeros((lt.vocab_size + 31) // 32, dtype=np.int32)
    m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: lt.vocab_size]
    return set(np.nonzero(bits)[0].tolist())


WEATHER = {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}}
ADD = {"name": "add", "parameters": {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}}
NOARGS = {"name": "ping", "parameters": None}
TOOLS = [WEATHER, ADD, NOARGS]


# --- the tiny tokenizer -------------------------------------------------------------------------

def test_tiny_tokenizer_has_text_tool_call_tokens(hf_tok, lt, tool_ids):
    assert len(SPECIAL_TOKENS) <= min(tool_ids) and max(tool_ids) < 512
    assert hf_tok.encode("<tool_call>x</tool_call>", add_special_tokens=False)[0] == tool_ids[0]
    assert hf_tok.decode(tool_ids, skip_special_tokens=True) == "<tool_call></tool_call>"  # text, not control
    for t in tool_ids:
        assert not lt.is_special_token(t)
    assert lt.decode_bytes(tool_ids) == b"<tool_call></tool_call>"
    assert lt.is_special_token(EOS)


def test_tiny_template_renders_qwen_tools(hf_tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"]}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": "sunny"},
    ]
    text = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "within <tool_call></tool_call> XML tags" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call><|im_end|>\n') in text
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" \
           "<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert plain == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                     "<|im_start|>assistant\n")
    system = hf_tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                        tokenize=False)
    assert system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


# --- json_object / json_schema ------------------------------------------------------------------

def test_json_object(lt, hf_tok):
    g = json_object_grammar()
    assert grammar_error(g, lt) is None
    assert accepts(lt, hf_tok, g, '{"a": 1, "b": [true, null, "x"], "c": {}}')
    assert accepts(lt, hf_tok, g, "{}")
    for bad in ('{"a":1}', '{"a": 1,"b": 2}', ' {"a": 1}', '{ "a": 1}', "[1]", '"x"', '{"a": 1}\n'):
        assert not accepts(lt, hf_tok, g, bad), bad


def test_json_schema_accepts_and_rejects(lt, hf_tok):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "tags": {"type": "array", "items": {
            "type": "string"}, "maxItems": 2}}, "required": ["name", "age"]}
    g = json_schema_grammar(schema, strict=False)
    assert grammar_error(g, lt) is None
    assert accepts(lt, hf_tok, g, '{"name": "Ann", "age": 3, "tags": ["a", "b"]}')
    assert accepts(lt, hf_tok, g, '{"name": "Ann", "age": 3}')
    assert not accepts(lt, hf_tok, g, '{"name": "Ann"}')  # age required
    assert not accepts(lt, hf_tok, g, '{"name": 1, "age": 3}')
    assert not accepts(lt, hf_tok, g, '{"name": "Ann", "age": -1}')
    assert not accepts(lt, hf_tok, g, '{"name": "Ann", "age": 3, "tags": ["a", "b", "c"]}')
    assert not accepts(lt, hf_tok, g, '{"age": 3, "name": "Ann"}')  # properties come in schema order


def test_strict_closes_objects_that_list_properties(lt, hf_tok):
    schema = {"type": "object", "properties": {
        "a": {"type": "integer"},
        "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "free": {"type": "object"},
        "open": {"type": "object", "properties": {"y": {"type": "integer"}}, "additionalProperties": True},
    }}
    loose, strict = json_schema_grammar(schema, strict=False), json_schema_grammar(schema, strict=True)
    extra_top = '{"a": 1, "zzz": 2}'
    extra_inner = '{"a": 1, "inner": {"x": 1, "zzz": 2}}'
    assert accepts(lt, hf_tok, loose, extra_top) and accepts(lt, hf_tok, loose, extra_inner)
    assert not accepts(lt, hf_tok, strict, extra_top)
    assert not accepts(lt, hf_tok, strict, extra_inner)
    assert accepts(lt, hf_tok, strict, '{"a": 1, "inner": {"x": 1}, "free": {"k": [1]}, "open": {"y": 1, "z": 2}}')
    assert "additionalProperties" not in schema  # the caller's schema is not modified


def test_client_x_guidance_cannot_loosen_whitespace(lt, hf_tok):
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": True, "lenient": True}}
    g = json_schema_grammar(schema, strict=False)
    assert accepts(lt, hf_tok, g, '{"a": 1}')
    assert not accepts(lt, hf_tok, g, '{ "a" :1 }')
    assert "uniqueItems" in grammar_error(
        json_schema_grammar({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, False), lt)


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
])
def test_unsupported_schema_features_are_named(lt, schema, keyword):
    g = json_schema_grammar(schema, strict=False)
    message = grammar_error(g, lt)
    assert message and keyword in message, message
    assert keyword in grammars.grammar_problem(g)  # the same verdict without a tokenizer
    nested = {"type": "object", "properties": {"p": schema}}
    if "$ref" in json.dumps(schema):
        nested = schema
    tool = tool_call_grammar("hermes", [{"name": "f", "parameters": nested}], False)
    assert keyword in (grammar_error(tool, lt) or ""), keyword


def test_schema_errors():
    for bad in ([1], "object", None, 3):
        with pytest.raises(SchemaError):
            json_schema_grammar(bad, strict=False)
    with pytest.raises(SchemaError):
        json_schema_grammar({"type": "object", "default": {1, 2}}, strict=False)  # not JSON
    with pytest.raises(SchemaError):
        json_schema_grammar({"type": "number", "maximum": float("nan")}, strict=False)
    deep: dict = {"type": "object"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nested too deeply"):
        json_schema_grammar(deep, strict=True)
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [], False)
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [WEATHER, dict(WEATHER)], False)  # duplicate name
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [{"name": ""}], False)
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [{"name": "f", "parameters": {"type": "string"}}], False)
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [{"name": "f", "parameters": [1]}], False)
    with pytest.raises(SchemaError):
        tool_call_grammar("hermes", [{"name": "f", "parameters": {"type": ["string", "null"]}}], False)
    with pytest.raises(ValueError):
        tool_call_grammar("mistral", [WEATHER], False)
    assert issubclass(SchemaError, ValueError)


# --- tool calls ---------------------------------------------------------------------------------

def test_hermes_single_call(lt, hf_tok):
    g = tool_call_grammar("hermes", TOOLS, parallel=False)
    assert grammar_error(g, lt) is None
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "get_weather", {"city": "Paris", "unit": "c"}))
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "add", {"a": 1, "b": -2}))
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "ping", {}))
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "ping", {"any": ["thing"]}))
    assert accepts(lt, hf_tok, g, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    bad = [
        tool_call_text("hermes", "add", {"city": "Paris"}),  # another tool's arguments
        tool_call_text("hermes", "get_weather", {"a": 1, "b": 2}),
        tool_call_text("hermes", "add", {"a": 1}),  # missing required
        tool_call_text("hermes", "add", {"a": 1, "b": 2, "c": 3}),  # additionalProperties false
        tool_call_text("hermes", "nope", {}),  # not a tool
        tool_call_text("hermes", "ping", 3),  # arguments must be an object
        '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>',  # name first
        '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>',  # compact separators
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',  # newlines
        tool_call_text("hermes", "ping", {}) + "\n" + tool_call_text("hermes", "ping", {}),  # not parallel
        tool_call_text("hermes", "ping", {}) + " ",  # nothing after the call
        'Sure! ' + tool_call_text("hermes", "ping", {}),
    ]
    for text in bad:
        assert not accepts(lt, hf_tok, g, text), text


def test_hermes_parallel(lt, hf_tok):
    g = tool_call_grammar("hermes", TOOLS, parallel=True)
    one = tool_call_text("hermes", "add", {"a": 1, "b": 2})
    two = one + "\n" + tool_call_text("hermes", "get_weather", {"city": "Oslo"})
    assert accepts(lt, hf_tok, g, one)
    assert accepts(lt, hf_tok, g, two)
    assert accepts(lt, hf_tok, g, two + "\n" + one)
    assert not accepts(lt, hf_tok, g, one + one)  # separated by "\n"
    assert not accepts(lt, hf_tok, g, one + "\n\n" + one)
    assert not accepts(lt, hf_tok, g, one + "\n")  # a separator needs another call
    assert not accepts(lt, hf_tok, g, one + "\n" + tool_call_text("hermes", "add", {"x": 1}))


def test_hermes_tool_call_token_is_one_token_or_pieces(lt, hf_tok, tool_ids):
    """Qwen writes <tool_call> as its single added token; the same text in ordinary BPE pieces
    is accepted too, and the single token is what the mask offers first."""
    g = tool_call_grammar("hermes", TOOLS, parallel=False)
    text = tool_call_text("hermes", "ping", {})
    single = hf_tok.encode(text, add_special_tokens=False)
    assert single[0] == tool_ids[0] and single[-1] == tool_ids[1]
    body = hf_tok.encode(text[len("<tool_call>"):-len("</tool_call>")], add_special_tokens=False)
    pieces = (hf_tok.encode("<tool", add_special_tokens=False) + hf_tok.encode("_call>", add_special_tokens=False)
              + body + hf_tok.encode("</tool", add_special_tokens=False)
              + hf_tok.encode("_call>", add_special_tokens=False))
    assert tool_ids[0] not in pieces and tool_ids[1] not in pieces
    assert hf_tok.decode(pieces) == text
    assert accepts(lt, hf_tok, g, ids=single)
    assert accepts(lt, hf_tok, g, ids=pieces)
    assert tool_ids[0] in allowed(lt, matcher(lt, g))


def test_grammar_ends_after_the_call(lt, hf_tok):
    g = tool_call_grammar("hermes", [NOARGS], parallel=False)
    m = matcher(lt, g)
    assert m.consume_tokens(hf_tok.encode(tool_call_text("hermes", "ping", {"k": 1}), add_special_tokens=False))
    assert allowed(lt, m) == {EOS}
    assert m.consume_token(EOS) and m.is_stopped() and not m.is_error()


def test_special_tokens_never_inside_json(lt, hf_tok):
    g = json_object_grammar()
    m = matcher(lt, g)
    assert m.consume_tokens(hf_tok.encode('{"a": "', add_special_tokens=False))
    mask = allowed(lt, m)
    assert not mask & set(range(len(SPECIAL_TOKENS)))
    assert not m.consume_token(1)  # <|im_start|> inside a string


def test_llama3_json(lt, hf_tok):
    g1 = tool_call_grammar("llama3_json", TOOLS, parallel=False)
    gn = tool_call_grammar("llama3_json", TOOLS, parallel=True)
    one = tool_call_text("llama3_json", "add", {"a": 1, "b": 2})
    assert one == '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    two = one + "; " + tool_call_text("llama3_json", "get_weather", {"city": "Rome"})
    assert grammar_error(g1, lt) is None and grammar_error(gn, lt) is None
    assert accepts(lt, hf_tok, g1, one) and not accepts(lt, hf_tok, g1, two)
    assert accepts(lt, hf_tok, gn, one) and accepts(lt, hf_tok, gn, two)
    assert not accepts(lt, hf_tok, gn, one + ";" + one)
    assert not accepts(lt, hf_tok, g1, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert not accepts(lt, hf_tok, g1, "<tool_call>\n" + one + "\n</tool_call>")


def test_tool_schema_refs_and_strict(lt, hf_tok):
    tool = {"name": "place", "strict": True, "parameters": {
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"]}},
        "properties": {"at": {"$ref": "#/$defs/pt"}}, "required": ["at"]}}
    g = tool_call_grammar("hermes", [tool], parallel=False)
    assert grammar_error(g, lt) is None
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "place", {"at": {"x": 1, "y": 2}}))
    assert not accepts(lt, hf_tok, g, tool_call_text("hermes", "place", {"at": {"x": 1, "y": 2, "z": 3}}))
    assert not accepts(lt, hf_tok, g, tool_call_text("hermes", "place", {"at": {"x": 1}, "more": 1}))
    loose = tool_call_grammar("hermes", [dict(tool, strict=False)], parallel=False)
    assert accepts(lt, hf_tok, loose, tool_call_text("hermes", "place", {"at": {"x": 1, "y": 2, "z": 3}}))


def test_tool_arguments_are_always_an_object(lt, hf_tok):
    tools = [{"name": "f", "parameters": {"type": ["object", "null"], "properties": {"x": {"type": "integer"}}}},
             {"name": "g", "parameters": {"properties": {"y": {"type": "integer"}}}}]
    g = tool_call_grammar("hermes", tools, parallel=False)
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "f", {"x": 1}))
    assert accepts(lt, hf_tok, g, tool_call_text("hermes", "g", {"y": 1}))
    assert not accepts(lt, hf_tok, g, tool_call_text("hermes", "f", None))
    assert not accepts(lt, hf_tok, g, tool_call_text("hermes", "g", 5))


def test_odd_tool_names_are_escaped(lt, hf_tok):
    name = 'say "hi"\\now'
    g = tool_call_grammar("hermes", [{"name": name, "parameters": None}], parallel=False)
    assert grammar_error(g, lt) is None
    text = tool_call_text("hermes", name, {})
    assert json.loads(text.split("\n")[1])["name"] == name
    assert accepts(lt, hf_tok, g, text)
