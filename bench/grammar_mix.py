"""Does a batch keep its speed when some rows are grammar-constrained? (issue 11, goal 8)

The engine runs in-process on a model (the embedded one by default). Each round decodes 8
concurrent streams of `--tokens` tokens twice, back to back: 8 plain streams, then 4 plain +
4 constrained by a JSON-schema grammar that cannot end early (an array of at least 400
integers). Rounds alternate which mix goes first, so drift hits both alike. Prints tokens/s
per mix and the ratio of each round (its two runs were back to back) and their median; the
target is >= 0.85.

    python -m bench.grammar_mix [--model embedded] [--rounds 3] [--tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

LONG_ARRAY = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 400}},
    "required": ["values"]}
PROMPTS = ["List some numbers.", "Count for me.", "Write numbers as JSON.", "Give me data.",
           "Numbers please.", "Some integers?", "An array of numbers.", "Digits, as JSON."]


def run_mix(engine, prompts: list[list[int]], tokens: int, constrained: int, grammar: str) -> float:
    """Tokens per second of one batch of len(prompts) streams; the first `constrained` use the grammar."""
    import gevent

    from engine.messages import AddRequest, TokenDelta
    from engine.sampling import SamplingParams

    def one(i: int, prompt: list[int]) -> int:
        request = AddRequest(f"mix-{time.monotonic_ns()}-{i}", prompt, tokens, SamplingParams(temperature=1.0),
                             ignore_eos=i >= constrained, grammar=grammar if i < constrained else None)
        stream = engine.submit(request)
        count = 0
        while stream.finished is None:
            count += sum(len(m.token_ids) for m in stream.next_batch(timeout=60) if isinstance(m, TokenDelta))
        assert stream.finished.finish_reason == "length", stream.finished
        return count

    started = time.perf_counter()
    jobs = [gevent.spawn(one, i, p) for i, p in enumerate(prompts)]
    gevent.joinall(jobs, raise_error=True)
    return sum(j.value for j in jobs) / (time.perf_counter() - started)


def main(argv=None) -> None:
    import gevent

    from app.generation.grammars import json_schema_grammar
    from config import load_settings
    from engine.engine import EngineState
    from engine.factory import build_engine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    engine = build_engine(load_settings({"MODEL": args.model, "MAX_CONCURRENT_REQUESTS": "8",
                                         "PREFIX_CACHE_BYTES": "0"}, dotenv=False))
    engine.start()
    while engine.state is EngineState.LOADING:
        gevent.sleep(0.1)
    assert engine.state is EngineState.READY, engine.error
    tok = engine.model.tokenizer
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    grammar = json_schema_grammar(LONG_ARRAY, True)
    run_mix(engine, prompts, 8, 4, grammar)  # warm-up: shapes, the matcher's first compile
    plain, mixed = [], []
    for round_ in range(args.rounds):
        order = [(plain, 0), (mixed, 4)] if round_ % 2 == 0 else [(mixed, 4), (plain, 0)]
        for out, constrained in order:
            out.append(run_mix(engine, prompts, args.tokens, constrained, grammar))
    engine.shutdown()
    while engine.state is EngineState.READY:  # let the engine thread finish before the process exits
        gevent.sleep(0.05)
    ratios = [m / p for p, m in zip(plain, mixed)]  # per round: both sides ran back to back
    print(json.dumps({"plain_tok_s": [round(x, 1) for x in plain], "mixed_tok_s": [round(x, 1) for x in mixed],
                      "ratios": [round(r, 3) for r in ratios]}))
    print(f"| streams | tok/s (median of {args.rounds} rounds) |\n| --- | --- |\n"
          f"| 8 plain | {statistics.median(plain):.1f} |\n| 4 plain + 4 grammar | {statistics.median(mixed):.1f} |\n\n"
          f"ratio mixed / plain, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
