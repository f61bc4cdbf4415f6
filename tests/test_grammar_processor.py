"""engine.grammar.GrammarProcessor driven like mlx-lm's BatchGenerator drives a logits
processor, with random logits (MLX on CPU): whatever is sampled from the masked logits is valid
output, the grammar's end allows only EOS, and padded vocabulary rows never win."""
from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from app.generation.grammars import json_schema_grammar, tool_call_grammar
from engine.grammar import GrammarProcessor, build_grammar_tokenizer, make_processor

EOS = 2  # <|im_end|>
VOCAB = 512  # the tiny model's embedding rows; its tokenizer has fewer tokens
PROMPT = [1, 10, 11, 12]

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "kind": {"enum": ["cat", "dog", None]},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
}, "required": ["name", "age", "kind", "ok", "tags"]}

TOOLS = [
    {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}}, "required": ["a", "b"]}, "strict": True},
    {"name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 5}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]},
     "strict": True},
]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    import transformers

    from engine.random_model import _write_tokenizer

    path = tmp_path_factory.mktemp("tok")
    _write_tokenizer(path, VOCAB)
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def lt(hf_tok):
    return build_grammar_tokenizer(hf_tok, [EOS])


def validate(schema, value) -> None:
    try:
        import jsonschema_rs
    except ImportError:  # pragma: no cover - the by-hand check below covers SCHEMA's shape
        jsonschema_rs = None
    if jsonschema_rs is not None:
        jsonschema_rs.validate(schema, value)
        return
    assert isinstance(value, dict) and set(schema.get("required", [])) <= set(value)  # pragma: no cover


def allowed(out: mx.array) -> np.ndarray:
    return np.nonzero(np.array(out[0].astype(mx.float32)) > -np.inf)[0]


def drive(proc: GrammarProcessor, steps: int, seed: int, vocab: int = VOCAB) -> tuple[list[int], list[set]]:
    """Sample from the processed logits until EOS (or `steps`); like BatchGenerator, the
    processor sees the prompt first, then the history grown by one sampled token per step."""
    mx.random.seed(seed)
    history = list(PROMPT)
    generated, masks = [], []
    for _ in range(steps):
        logits = mx.random.normal((1, vocab)) * 3
        out = proc(mx.array(history, dtype=mx.int32), logits)
        assert out.shape == logits.shape and out.dtype == logits.dtype
        mask = allowed(out)
        assert len(mask) > 0
        assert mask.max() < proc_tokenizer_size(proc), "a padded vocabulary row was allowed"
        masks.append(set(mask.tolist()))
        token = int(mx.random.categorical(out[0]).item())
        assert token in masks[-1]
        history.append(token)
        generated.append(token)
        if token == EOS:
            break
    return generated, masks


def proc_tokenizer_size(proc: GrammarProcessor) -> int:
    return proc._tok_words.size * 32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sampling_yields_valid_json(lt, hf_tok, seed):
    grammar = json_schema_grammar(SCHEMA, strict=True)
    proc = make_processor(grammar, lt, [EOS], VOCAB)
    generated, masks = drive(proc, 200, seed)
    assert generated[-1] == EOS, hf_tok.decode(generated)
    assert masks[-1] == {EOS}  # complete: only EOS
    text = hf_tok.decode(generated[:-1])
    value = json.loads(text)
    validate(SCHEMA, value)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", re.sub(r"[,:] ", "", outside_strings)), text  # compact: only ", " and ": "


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_sampling_yields_valid_tool_calls(lt, hf_tok, seed):
    grammar = tool_call_grammar("hermes", TOOLS, parallel=True)
    proc = make_processor(grammar, lt, [EOS], VOCAB)
    generated, masks = drive(proc, 300, seed)
    assert generated[-1] == EOS, hf_tok.decode(generated)
    assert generated[0] == hf_tok.convert_tokens_to_ids("<tool_call>")  # the single token, like Qwen
    text = hf_tok.decode(generated[:-1])
    blocks = text.split("\n</tool_call>\n")
    assert text.endswith("\n</tool_call>")
    schemas = {t["name"]: t["parameters"] for t in TOOLS}
    for block in blocks:
        assert block.startswith("<tool_call>\n")
        call = json.loads(block.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        assert list(call) == ["name", "arguments"]
        validate(dict(schemas[call["name"]], additionalProperties=False), call["arguments"])


def test_eos_only_after_the_grammar_and_all_model_eos_ids(hf_tok):
    lt2 = build_grammar_tokenizer(hf_tok, [EOS, 0])
    grammar = tool_call_grammar("llama3_json", [{"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"const": 1}}, "required": ["x"], "additionalProperties": False}}],
        parallel=False)
    proc = make_processor(grammar, lt2, [EOS, 0], VOCAB)
    text = '{"name": "f", "parameters": {"x": 1}}'
    history = list(PROMPT)
    out = proc(mx.array(history), mx.zeros((1, VOCAB)))
    for token in hf_tok.encode(text, add_special_tokens=False):
        assert token in set(allowed(out).tolist())
        history.append(token)
        out = proc(mx.array(history), mx.zeros((1, VOCAB)))
    assert set(allowed(out).tolist()) == {0, EOS}
    assert proc.is_finished()


def test_padded_rows_masked_and_first_call_consumes_nothing(lt, hf_tok):
    proc = make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], VOCAB)
    # The prompt's last token is not a grammar token: the first call must not feed it.
    out = proc(mx.array([5, 6, 7, 400]), mx.full((1, VOCAB), 5.0))
    mask = allowed(out)
    assert set(mask.tolist()) <= set(range(lt.vocab_size))
    assert np.all(np.array(out[0, lt.vocab_size:]) == -np.inf)
    assert hf_tok.decode(mask.tolist()).startswith("{")
    assert np.all(np.array(out[0])[mask] == 5.0)  # allowed logits pass through untouched


def test_a_rejected_token_ends_the_row_instead_of_failing_the_batch(lt, hf_tok):
    proc = make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], VOCAB)
    proc(mx.array(PROMPT), mx.zeros((1, VOCAB)))
    bad = hf_tok.encode("x", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match="rejected token"):
        proc.consume(bad)  # the matcher itself refuses it ...
    proc = make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], VOCAB)
    proc(mx.array(PROMPT), mx.zeros((1, VOCAB)))
    out = proc(mx.array(PROMPT + [bad]), mx.zeros((1, VOCAB)))  # ... but in a step the row just ends
    assert proc.failed and allowed(out).tolist() == [EOS]


def test_masks_survive_lazy_evaluation(lt, hf_tok):
    """The numpy buffer is reused every step: an unevaluated earlier output keeps its own mask."""
    proc = make_processor(tool_call_grammar("hermes", TOOLS, parallel=False), lt, [EOS], VOCAB)
    first = proc(mx.array(PROMPT), mx.zeros((1, VOCAB)))
    tool_call = hf_tok.convert_tokens_to_ids("<tool_call>")
    second = proc(mx.array(PROMPT + [tool_call]), mx.zeros((1, VOCAB)))
    mx.eval(second, first)
    assert allowed(first).tolist() == [tool_call]
    assert allowed(second).tolist() == hf_tok.encode("\n", add_special_tokens=False)


def test_bfloat16_logits_and_wrong_width(lt):
    proc = make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], VOCAB)
    out = proc(mx.array(PROMPT), mx.zeros((1, VOCAB), dtype=mx.bfloat16))
    assert out.dtype == mx.bfloat16
    with pytest.raises(ValueError):
        make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], lt.vocab_size - 1)
    with pytest.raises(ValueError):
        make_processor("start: nope", lt, [EOS], VOCAB)
    wide = make_processor(json_schema_grammar({"type": "object"}, strict=False), lt, [EOS], VOCAB)
    with pytest.raises(ValueError):
        wide(mx.array(PROMPT), mx.zeros((1, VOCAB + 64)))


def test_mlx_lm_tokenizer_wrapper_is_unwrapped(hf_tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    lt2 = build_grammar_tokenizer(TokenizerWrapper(hf_tok, eos_token_ids=[EOS]), [EOS])
    assert lt2.vocab_size == len(hf_tok) and lt2.eos_tokens == [EOS]
    assert not lt2.is_special_token(hf_tok.convert_tokens_to_ids("<tool_call>"))


def test_row_eos_ids_win_where_the_grammar_may_end(lt, hf_tok):
    """Mid-grammar (a parallel call may follow, or the answer may end) EOS is allowed: the row's
    EOS ids, even where they differ from those the tokenizer was built with."""
    grammar = tool_call_grammar("hermes", [{"name": "f", "parameters": None}], parallel=True)
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    for eos_ids in ([EOS], [EOS, 0]):
        proc = make_processor(grammar, lt, eos_ids, VOCAB)
        history = list(PROMPT)
        proc(mx.array(history), mx.zeros((1, VOCAB)))
        for token in hf_tok.encode(text, add_special_tokens=False):
            history.append(token)
            out = proc(mx.array(history), mx.zeros((1, VOCAB)))
        mask = set(allowed(out).tolist())
        assert mask == set(eos_ids) | set(hf_tok.encode("\n", add_special_tokens=False)), mask
