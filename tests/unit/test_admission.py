"""Admission's completion budgets, without a server: the cap agents' max_tokens becomes."""
from types import SimpleNamespace

import pytest

from app.generation.admission import Admission


def admission(longest=None) -> Admission:
    engine = SimpleNamespace(model=SimpleNamespace(context_length=1024), longest_alone=lambda: longest)
    return Admission(engine, SimpleNamespace(max_tokens_limit=64))


@pytest.mark.parametrize("asked, prompt_len, longest, expected", [
    (10, 100, None, 10),
    (32000, 100, None, 64),  # MAX_TOKENS_LIMIT leaves less
    (32000, 1000, None, 24),  # the context leaves less
    (32000, 100, 140, 40),  # the KV budget holds 140 tokens for one sequence
    (32000, 1023, None, 1),
    (32000, 1024, None, 1),  # the prompt fills the context: max_tokens()'s 400 follows
    (32000, 5000, None, 1),
])
def test_an_agents_max_tokens_is_a_cap(asked, prompt_len, longest, expected):
    assert admission(longest).cap_tokens(asked, prompt_len) == expected
