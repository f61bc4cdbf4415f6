"""Tool-call parsers: the whole-text and streaming paths agree on content and calls, whatever
the split of the text into deltas, and the streamed deltas have OpenAI's shape."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from app.text.tool_parsers import PARSERS, ToolCall, ToolCallDelta, ToolParser, get_parser, new_call_id

ID = re.compile(r"^call_[A-Za-z0-9]{24}$")
TAGS = {"hermes": ("<tool_call>", "</tool_call>"), "llama3_json": ("<|python_tag|>",)}

W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
W_ARGS = '{"city": "Paris", "unit": "c"}'
WEATHER = ("get_weather", W_ARGS)
NESTED = '{"filter": {"and": [{"x": [1, 2, {"y": null}]}, true, []]}, "n": -1.5e3, "e": {}}'
TRICKY = r'{"code": "if (a) { return b; }", "html": "</tool_call><tool_call>x", "q": "\"}\\", "s": "; {"}'
UNICODE = '{"city": "Zürich", "note": "東京 🌧 \\u00e9\\n"}'

# (case id, parser, text, parallel, expected content, expected [(name, arguments)])
CASES = [
    ("h-single", "hermes", f"<tool_call>\n{W}\n</tool_call>", True, "", [WEATHER]),
    ("h-two", "hermes", f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{{\"name\": \"f\", \"arguments\": {{}}}}\n"
     "</tool_call>", True, "", [WEATHER, ("f", "{}")]),
    ("h-text-before", "hermes", f"Let me check.\n\n<tool_call>\n{W}\n</tool_call>", True, "Let me check.\n\n",
     [WEATHER]),
    ("h-text-after", "hermes", f"<tool_call>{W}</tool_call>\nDone.", True, "\nDone.", [WEATHER]),
    ("h-no-call", "hermes", "Hello! 1 < 2 and <b>bold</b>, <tool_ even </tool.", True,
     "Hello! 1 < 2 and <b>bold</b>, <tool_ even </tool.", []),
    ("h-compact", "hermes", '<tool_call>{"name":"f","arguments":{}}</tool_call>', True, "", [("f", "{}")]),
    ("h-unicode", "hermes", f'<tool_call>{{"name": "météo", "arguments": {UNICODE}}}</tool_call>', True, "",
     [("météo", UNICODE)]),
    ("h-nested", "hermes", f'<tool_call>\n{{"name": "q", "arguments": {NESTED}}}\n</tool_call>', True, "",
     [("q", NESTED)]),
    ("h-tricky-strings", "hermes", f'<tool_call>{{"name": "run", "arguments": {TRICKY}}}</tool_call>', True, "",
     [("run", TRICKY)]),
    ("h-unterminated-complete", "hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', True, "Sure.",
     [("f", '{"a": 1}')]),
    ("h-unterminated-partial", "hermes", 'Hi <tool_call>\n{"name": "get_we', True, 'Hi \n{"name": "get_we', []),
    ("h-invalid-json", "hermes", '<tool_call>{"name": get_weather}</tool_call>', True, '{"name": get_weather}', []),
    ("h-not-json", "hermes", "<tool_call>\nnot json\n</tool_call>", True, "\nnot json\n", []),
    ("h-no-name", "hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>', True, '{"arguments": {"a": 1}}', []),
    ("h-empty-name", "hermes", '<tool_call>{"name": ""}</tool_call>', True, '{"name": ""}', []),
    ("h-parameters", "hermes", '<tool_call>{"name": "f", "parameters": {"a": [1]}}</tool_call>', True, "",
     [("f", '{"a": [1]}')]),
    ("h-first-synonym-wins", "hermes", '<tool_call>{"name": "f", "parameters": {"a": 1}, "arguments": {"b": 2}}'
     "</tool_call>", True, "", [("f", '{"a": 1}')]),
    ("h-args-before-name", "hermes", '<tool_call>{"arguments": {"a": "x"}, "name": "f"}</tool_call>', True, "",
     [("f", '{"a": "x"}')]),
    ("h-missing-args", "hermes", '<tool_call>{"name": "f"}</tool_call>', True, "", [("f", "{}")]),
    ("h-string-args", "hermes", r'<tool_call>{"name": "f", "arguments": "{\"a\": 1}"}</tool_call>', True, "",
     [("f", r'"{\"a\": 1}"')]),
    ("h-spaces-in-args", "hermes", '<tool_call>{ "name" : "f" , "arguments" : { "a" : 1 } \n}</tool_call>', True,
     "", [("f", '{ "a" : 1 }')]),
    ("h-escaped-name", "hermes", '<tool_call>{"name": "get_\\u0077eather", "arguments": {}}</tool_call>', True,
     "", [("get_weather", "{}")]),
    ("h-stray-tags", "hermes", "a</tool_call>b <tool_call> c", True, "ab  c", []),
    ("h-stray-open-then-call", "hermes", '<tool_call>oops <tool_call>{"name": "f"}</tool_call>', True, "oops ",
     [("f", "{}")]),
    ("h-junk-after-object", "hermes", '<tool_call>{"name": "f"} x</tool_call>', True, " x", [("f", "{}")]),
    ("h-serial-parallel-false", "hermes", f"Ok.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n"
     '{"name": "f", "arguments": {"b": 2}}\n</tool_call>', False, "Ok.\n", [WEATHER]),
    ("h-whitespace-only", "hermes", "  \n ", True, "  \n ", []),
    ("h-empty", "hermes", "", True, "", []),
    ("l-single", "llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', True, "",
     [WEATHER]),
    ("l-python-tag", "llama3_json", f"<|python_tag|>{W}", True, "", [WEATHER]),
    ("l-leading-space", "llama3_json", f"\n\n {W}\n", True, "", [WEATHER]),
    ("l-semicolons", "llama3_json", f'{W}; {{"name": "f", "parameters": {{}}}};{{"name": "g"}} \n;\n {{"name": "h"}}',
     True, "", [WEATHER, ("f", "{}"), ("g", "{}"), ("h", "{}")]),
    ("l-semicolons-parallel-false", "llama3_json", f'{W}; {{"name": "f", "parameters": {{"x": 1}}}}', False, "",
     [WEATHER]),
    ("l-plain", "llama3_json", "The weather is nice; {really}.", True, "The weather is nice; {really}.", []),
    ("l-plain-leading-space", "llama3_json", "  Hi {there}", True, "  Hi {there}", []),
    ("l-plain-angle", "llama3_json", "<|python but not the tag", True, "<|python but not the tag", []),
    ("l-tag-then-text", "llama3_json", "<|python_tag|>print(1)", True, "print(1)", []),
    ("l-json-not-a-call", "llama3_json", ' {"result": 42} ', True, ' {"result": 42} ', []),
    ("l-invalid-first", "llama3_json", '{"name": bad}', True, '{"name": bad}', []),
    ("l-nested-unicode", "llama3_json", f'{{"name": "q", "arguments": {NESTED}}}; {{"name": "z", '
     f'"parameters": {UNICODE}}}', True, "", [("q", NESTED), ("z", UNICODE)]),
    ("l-tricky-strings", "llama3_json", f'{{"name": "run", "parameters": {TRICKY}}}', True, "", [("run", TRICKY)]),
    ("l-text-after", "llama3_json", f"{W} and then some", True, " and then some", [WEATHER]),
    ("l-trailing-semicolon", "llama3_json", f"{W};", True, ";", [WEATHER]),
    ("l-second-not-a-call", "llama3_json", f'{W}; {{"x": 1}}', True, '; {"x": 1}', [WEATHER]),
    ("l-args-before-name", "llama3_json", '{"parameters": {"a": 1}, "name": "f"}', True, "", [("f", '{"a": 1}')]),
    ("l-empty", "llama3_json", "", True, "", []),
]
CASE_IDS = [c[0] for c in CASES]


def random_chunks(text: str, seed: int = 1234) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i:i + n])
        i += n
    return pieces


SPLITS = {"chars": list, "random": random_chunks, "whole": lambda text: [text]}


def stream(parser_name: str, pieces: list[str], parallel: bool = True):
    """Feed the pieces then finish: (content, deltas, parser); no piece of content shows a tag."""
    parser = get_parser(parser_name)(parallel)
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for piece in pieces:
        text, more = parser.feed(piece)
        content.append(text)
        deltas += more
    text, more = parser.finish()
    content.append(text)
    deltas += more
    for tag in TAGS[parser_name]:
        assert not any(tag in c for c in content) and tag not in "".join(content), (tag, content)
    return "".join(content), deltas, parser


def fold(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Rebuild the calls from their deltas, checking OpenAI's delta invariants on the way."""
    calls: list[ToolCall] = []
    for d in deltas:
        assert isinstance(d, ToolCallDelta) and isinstance(d.arguments, str)
        if d.index == len(calls):  # a call's first delta: indexes start at 0 and go up by one
            assert d.id is not None and ID.match(d.id) and d.name, d
            calls.append(ToolCall(d.id, d.name, d.arguments))
        else:  # later deltas: same call as the previous delta, no id or name again
            assert d.index == len(calls) - 1, f"index {d.index} after {len(calls)} calls"
            assert d.id is None and d.name is None, d
            calls[-1].arguments += d.arguments
    assert len({c.id for c in calls}) == len(calls)
    return calls


def pairs(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_extract(case):
    _, name, text, parallel, content, calls = case
    got_content, got_calls = get_parser(name).extract(text, parallel)
    assert got_content == content
    assert pairs(got_calls) == calls
    assert all(ID.match(c.id) for c in got_calls)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stream_matches_extract(case, split):
    _, name, text, parallel, content, calls = case
    got_content, deltas, parser = stream(name, SPLITS[split](text), parallel)
    folded = fold(deltas)
    assert got_content == content
    assert pairs(folded) == calls
    assert parser.calls == folded  # same ids, same arguments as streamed


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_split_at_every_position(case):
    _, name, text, parallel, content, calls = case
    for i in range(len(text) + 1):
        got_content, deltas, _ = stream(name, [text[:i], text[i:]], parallel)
        assert (got_content, pairs(fold(deltas))) == (content, calls), f"split at {i}"


@pytest.mark.parametrize("name, text", [
    ("hermes", f'Checking.<tool_call>\n{{"name": "q", "arguments": {NESTED}}}\n</tool_call>'),
    ("llama3_json", f'{{"name": "q", "parameters": {NESTED}}}'),
])
def test_arguments_stream_while_generated(name, text):
    parser = get_parser(name)()
    seen: list[tuple[int, ToolCallDelta]] = []  # (position of the char fed, delta)
    for i, ch in enumerate(text):
        seen += [(i, d) for d in parser.feed(ch)[1]]
    seen += [(len(text), d) for d in parser.finish()[1]]
    first_pos, first = seen[0]
    assert (first.name, first.arguments) == ("q", "")
    assert text[:first_pos + 1].endswith('"q"')  # announced on the name's closing quote
    fragments = [(i, d.arguments) for i, d in seen[1:] if d.arguments]
    assert len(fragments) > 10
    assert "".join(f for _, f in fragments) == NESTED
    assert fragments[-1][0] < len(text) - 1  # the arguments were complete before the object closed


def test_args_before_name_come_as_one_delta_when_the_object_closes():
    text = '<tool_call>{"arguments": {"a": [1, 2]}, "name": "f"}</tool_call>'
    parser = get_parser("hermes")()
    seen = [(i, d) for i, ch in enumerate(text) for d in parser.feed(ch)[1]]
    assert len(seen) == 1 and text[:seen[0][0] + 1].endswith('"f"}')
    assert (seen[0][1].name, seen[0][1].arguments) == ("f", '{"a": [1, 2]}')


@pytest.mark.parametrize("name, text, streamed, streamed_args, extracted", [
    ("hermes", 'Hm <tool_call>{"name": "f", "arguments": {"a": 1, ', "Hm ", '{"a": 1,',
     'Hm {"name": "f", "arguments": {"a": 1, '),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>', "", '{"a": 1,}',
     '{"name": "f", "arguments": {"a": 1,}}'),
    ("hermes", '<tool_call>{"name": "f"', "", "", '{"name": "f"'),
    ("llama3_json", '{"name": "f", "parameters": {"a": tru', "", '{"a": tru', '{"name": "f", "parameters": {"a": tru'),
])
def test_announced_call_survives_invalid_json(name, text, streamed, streamed_args, extracted):
    """The documented difference: a streamed name cannot be taken back, so the call stays
    (with the arguments streamed so far), where extract gives the text as content."""
    for split in SPLITS.values():
        content, deltas, parser = stream(name, split(text))
        assert content == streamed and pairs(fold(deltas)) == [("f", streamed_args)]
        assert pairs(parser.calls) == [("f", streamed_args)]
    assert get_parser(name).extract(text) == (extracted, [])


FUZZ_OBJECTS = ['{"name": "f", "arguments": {"a": "}</tool_call>; {"}}', '{"arguments": [1, {"x": "\\"}"}], "name": "g"}',
                '{ "name" : "h" }', '{"parameters": "s", "name": "i", "arguments": 3}', '{"name": "j", "parameters": {}}']
FUZZ_JUNK = ["{", "}", "[", "]", ",", ":", "\\", '"a"', "x", '{"a": 1}', '{"name": 1}', '{"name": ""}', "\n", " ", ";",
             "<", "é"]
# the python tag only counts at the start of a reply (elsewhere it is plain content): fuzzed as a prefix
FUZZ_TAGS = {"hermes": ["<tool_call>", "</tool_call>", "<tool", "</tool_c"], "llama3_json": ["; ", "<|py"]}


@pytest.mark.parametrize("name", sorted(FUZZ_TAGS))
def test_random_texts_agree(name):
    """Random mixes of tags, complete call objects and JSON-ish junk: every split agrees with extract.
    (No junk piece can announce a call that later breaks, so no documented difference applies.)"""
    rng = random.Random(7)
    pieces = FUZZ_OBJECTS + FUZZ_JUNK + FUZZ_TAGS[name]
    for n in range(250):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        if name == "llama3_json" and n % 2:
            text = rng.choice(["", " ", "\n"]) + "<|python_tag|>" + text
        parallel = n % 3 != 0
        content, calls = get_parser(name).extract(text, parallel)
        for pieces_of_text in (list(text), random_chunks(text, n), [text]):
            got, deltas, _ = stream(name, pieces_of_text, parallel)
            assert (got, pairs(fold(deltas))) == (content, pairs(calls)), (text, parallel)


def test_registry_and_ids():
    assert set(PARSERS) == {"hermes", "llama3_json"}
    for name, cls in PARSERS.items():
        assert get_parser(name) is cls and cls.name == name and issubclass(cls, ToolParser)
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(ID.match(i) for i in ids)


def test_no_flask_or_mlx_imports():
    folder = Path(__file__).resolve().parents[2] / "app" / "text" / "tool_parsers"
    for path in folder.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(flask|mlx)", path.read_text(), re.M), path
