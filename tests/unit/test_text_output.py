"""Detokenization and stop strings, on a real tokenizer."""
import pytest

from app.output import TextAssembler
from engine.detokenizer import Detokenizer, TokenTable


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("text", ["Hello world! The capital of France is Paris.", "é ü 你好 🍎 done"])
@pytest.mark.parametrize("use_table", [True, False])
def test_token_by_token_decoding_equals_full_decode(tokenizer, text, use_table):
    ids = tokenizer.encode(text, add_special_tokens=False)
    table = TokenTable.build(tokenizer) if use_table else None
    assert (table is not None) == use_table
    detok = Detokenizer(tokenizer, table)
    out = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert out == tokenizer.decode(ids) == text


def test_special_tokens_are_not_text(tokenizer):
    detok = Detokenizer(tokenizer, TokenTable.build(tokenizer))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert detok.add(tokenizer.encode("Hi", add_special_tokens=False) + [end]) == "Hi"


def stream_through(tokenizer, text, stops, chunk=1):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assembler = TextAssembler(Detokenizer(tokenizer, TokenTable.build(tokenizer)), stops)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(assembler.add(ids[i:i + chunk]))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


@pytest.mark.parametrize("text, stops, expected, stopped", [
    ("Hello world! The capital", ["world"], "Hello ", True),
    ("Hello world! The capital", ["capital", "!"], "Hello world", True),
    ("Hello world! The capital", ["Paris"], "Hello world! The capital", False),
    ("Hello world! The capital", [], "Hello world! The capital", False),
    ("Hello world! The cap", ["capital"], "Hello world! The cap", False),
])
@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, text, stops, expected, stopped, chunk):
    pieces, assembler = stream_through(tokenizer, text, stops, chunk)
    assert "".join(pieces) == expected
    assert assembler.stopped is stopped
    for stop in stops:  # no released prefix ever contains a stop string
        assert stop not in "".join(pieces)
