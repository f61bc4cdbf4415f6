"""What grammar-constrained decoding costs per step for one batch row, at a Qwen-sized vocabulary.

One step is what `engine.grammar.GrammarProcessor` does between two samples: feed the sampled
token to the llguidance matcher, compute the next token mask, and apply it to an mx logits row
(151,936 wide, Qwen2.5's embedding rows), evaluated. The processor is driven through the tokens
of a valid answer, so every step takes the grammar's real path; the first call (which only
computes the first mask) is timed too. "matcher only" is the llguidance part of a step
(consume + mask into the numpy words); "apply only" is the rest alone (unpack a fixed mask, and
`mx.where` over the row, evaluated), for scale: on MLX's CPU backend that row pass dominates.

No real Qwen tokenizer is available offline, so the script builds a byte-level BPE tokenizer
of Qwen2.5's size (151,643 regular tokens, its three ChatML special tokens, and `<tool_call>` /
`</tool_call>` as non-special added tokens) from a *constructed* vocabulary, not a trained one:
the 256 byte tokens plus a prefix-closed set of generated pieces (English-like words with and
without a leading space, digit groups, JSON/code punctuation runs, indentation, and
multi-byte CJK / accented characters), each piece merged from its prefix and its last symbol.
The token trie llguidance walks is then Qwen-like in size and shape; the canonical
tokenization of forced text is not Qwen's, which only changes which of several equivalent
token sequences the mask offers.

    python -m bench.grammar_cost [--repeats 3]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

N_REGULAR = 151_643  # Qwen2.5's regular vocabulary
MODEL_VOCAB = 151_936  # Qwen2.5's embedding rows (padded)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_ADDED = ["<tool_call>", "</tool_call>"]

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]},
    "active": {"type": "boolean"}}, "required": ["name", "age", "email", "tags", "address", "active"]}
SCHEMA_ANSWER = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "engines", '
                 '"poetry"], "address": {"city": "London", "zip": "W1 2AB"}, "active": true}')
TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}},
    {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        "required": ["query"]}},
    {"name": "send_email", "parameters": {"type": "object", "properties": {
        "to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
        "required": ["to", "subject", "body"]}},
]
TOOL_ANSWER = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "celsius"}}'
               '\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "best coffee near '
               'Union Square", "limit": 5}}\n</tool_call>')


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map (what byte-level BPE vocabularies spell tokens in)."""
    from engine.detokenizer import _unicode_to_byte

    return {b: c for c, b in _unicode_to_byte().items()}


def _pieces(rng: random.Random):
    """An endless stream of text pieces of the kinds a 150k BPE vocabulary holds."""
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "y",
              "z", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th",
              "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "io", "oo", "ou", "y"]
    codas = ["", "", "b", "ck", "d", "ft", "g", "l", "ll", "m", "n", "nd", "ng", "nt", "p", "r", "rd", "rs", "s",
             "ss", "st", "t", "tion", "x", "ing", "ed", "er", "ly", "ment", "ness"]
    punct = list("{}[]()<>:;,.!?\"'`/\\|-_=+*&^%$#@~") + ["\n", "\t"]
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 6000)] + [chr(c) for c in range(0xC0, 0x250)]
    while True:
        kind = rng.random()
        if kind < 0.70:
            word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                           for _ in range(rng.choice([1, 1, 2, 2, 3])))
            word = word.capitalize() if rng.random() < 0.2 else word
            yield (" " + word) if rng.random() < 0.55 else word
        elif kind < 0.76:
            yield rng.choice(["", " "]) + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
        elif kind < 0.86:
            yield rng.choice(["", " ", "  "]) + "".join(rng.choice(punct) for _ in range(rng.randint(1, 3)))
        elif kind < 0.90:
            yield rng.choice(["\n", ""]) + " " * rng.randint(2, 16)
        else:
            yield rng.choice(["", " "]) + "".join(rng.choice(cjk) for _ in range(rng.randint(1, 3)))


def build_tokenizer(seed: int = 0):
    """A transformers fast tokenizer of N_REGULAR constructed byte-level BPE tokens (see the
    module docstring) plus Qwen2.5's special and non-special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    to_char = _byte_level_alphabet()
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str, left: str | None, right: str | None) -> None:
        vocab[token] = len(vocab)
        if left is not None:
            merges.append((left, right))

    for b in range(256):
        add(to_char[b], None, None)
    rng = random.Random(seed)
    for piece in _pieces(rng):
        spelled = "".join(to_char[b] for b in piece.encode("utf-8"))
        for end in range(2, len(spelled) + 1):  # prefix-closed: every prefix is a token too
            token = spelled[:end]
            if token not in vocab:
                add(token, spelled[: end - 1], spelled[end - 1])
                if len(vocab) == N_REGULAR:
                    break
        if len(vocab) >= N_REGULAR:
            break
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def time_grammar(grammar: str, answer_ids: list[int], lt, eos: list[int], repeats: int) -> tuple[list[float], float]:
    """(per-step microseconds over `repeats` runs through the answer, mean grammar compile ms)."""
    import mlx.core as mx

    from engine.grammar import make_processor

    logits = mx.random.normal((1, MODEL_VOCAB))
    mx.eval(logits)
    steps, compile_ms = [], []
    for _ in range(repeats + 1):  # the first run warms caches and is not counted
        t0 = time.perf_counter()
        proc = make_processor(grammar, lt, eos, MODEL_VOCAB)
        compile_ms.append((time.perf_counter() - t0) * 1000)
        history = mx.array([1, 5, 6], dtype=mx.int32)
        run = []
        for token in [None, *answer_ids]:
            if token is not None:
                history = mx.concatenate([history, mx.array([token], dtype=mx.int32)])
                mx.eval(history)
            t0 = time.perf_counter()
            mx.eval(proc(history, logits))
            run.append((time.perf_counter() - t0) * 1e6)
        if not proc.matcher.is_accepting():
            raise SystemExit("the answer does not match its grammar: " + proc.matcher.get_error())
        steps.append(run)
    return [us for run in steps[1:] for us in run], statistics.mean(compile_ms[1:])


def time_matcher_only(grammar: str, answer_ids: list[int], lt, eos: list[int], repeats: int) -> list[float]:
    """Per-step microseconds of the llguidance part alone: consume the token, compute the mask."""
    from engine.grammar import make_processor

    out = []
    for _ in range(repeats + 1):
        proc = make_processor(grammar, lt, eos, MODEL_VOCAB)
        run = []
        t0 = time.perf_counter()
        proc.mask_words()
        run.append((time.perf_counter() - t0) * 1e6)
        for token in answer_ids:
            t0 = time.perf_counter()
            proc.consume(token)
            proc.mask_words()
            run.append((time.perf_counter() - t0) * 1e6)
        out.append(run)
    return [us for run in out[1:] for us in run]


def time_apply_only(repeats: int = 200) -> list[float]:
    import mlx.core as mx
    import numpy as np

    logits = mx.random.normal((1, MODEL_VOCAB))
    mx.eval(logits)
    words = np.full((MODEL_VOCAB + 31) // 32, 0x55555555, dtype=np.int32)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()  # what GrammarProcessor.__call__ does after the mask
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:MODEL_VOCAB]
        mx.eval(mx.where(mx.array(bits.view(np.bool_)), logits, -float("inf")))
        out.append((time.perf_counter() - t0) * 1e6)
    return out[10:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs through each answer (after one warm-up)")
    args = parser.parse_args(argv)

    from app.generation.grammars import json_schema_grammar, tool_call_grammar
    from engine.grammar import build_grammar_tokenizer

    t0 = time.perf_counter()
    hf = build_tokenizer()
    t_build = time.perf_counter() - t0
    eos = [hf.convert_tokens_to_ids("<|im_end|>")]
    t0 = time.perf_counter()
    lt = build_grammar_tokenizer(hf, eos)
    t_lt = time.perf_counter() - t0
    print(f"tokenizer: {len(hf)} tokens ({t_build:.1f} s to construct); llguidance tokenizer built in {t_lt:.2f} s; "
          f"logits rows {MODEL_VOCAB}")

    rows = []
    for label, grammar, answer in (
        ("json_schema (strict)", json_schema_grammar(SCHEMA, strict=True), SCHEMA_ANSWER),
        ("hermes tools (3, parallel)", tool_call_grammar("hermes", TOOLS, parallel=True), TOOL_ANSWER),
    ):
        ids = hf.encode(answer, add_special_tokens=False)
        per_step, compile_ms = time_grammar(grammar, ids, lt, eos, args.repeats)
        matcher = time_matcher_only(grammar, ids, lt, eos, args.repeats)
        rows.append((label, len(ids) + 1, per_step, f"{statistics.mean(matcher):.0f} / {percentile(matcher, 99):.0f}",
                     f"{compile_ms:.1f}"))
    rows.append(("apply only (fixed mask)", 1, time_apply_only(), "-", "-"))

    print()
    print("| vocab | grammar | steps/answer | mean µs | p50 µs | p99 µs | matcher only mean / p99 µs "
          "| compile ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for label, n_steps, per_step, matcher, compile_ms in rows:
        print(f"| {MODEL_VOCAB:,} | {label} | {n_steps} | {statistics.mean(per_step):.0f} | "
              f"{percentile(per_step, 50):.0f} | {percentile(per_step, 99):.0f} | {matcher} | {compile_ms} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
