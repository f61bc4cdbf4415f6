"""GenerationRequest: what every API edge translates its request into (the one internal type)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    id: str  # the API object's id (chatcmpl-..., msg_..., resp_...): engine ids derive from it
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    n: int = 1
    logprobs: Optional[int] = None  # None: none; k: the sampled token's and the k most likely
    grammar: Optional[str] = None  # llguidance grammar every choice must match
    stop_strings: tuple[str, ...] = ()
    tool_parser: Optional[type] = None  # a ToolParser class: parse tool calls out of the text
    parallel_tool_calls: bool = True
    ignore_eos: bool = False
    cache_scope: str = ""  # the API key's id when keys are on: tenants never share cached prompts
    log_id: str = ""  # X-Request-ID, for the request log
    prompt_text: Optional[str] = None  # only when LOG_PROMPTS is on
    more_prompts: tuple[list[int], ...] = ()  # /v1/completions with several prompts: n choices each
    prompt_logprobs: Optional[int] = None  # score the prompt's tokens too (k alternatives)

    @property
    def prompts(self) -> list[list[int]]:
        return [self.prompt_tokens, *self.more_prompts]

    @property
    def choices(self) -> int:
        return self.n * (1 + len(self.more_prompts))

    def prompt_of(self, index: int) -> list[int]:
        """Choice i answers prompt i // n (OpenAI's order for several prompts)."""
        return self.prompts[index // self.n]

    def choice_seed(self, index: int) -> Optional[int]:
        """Choice i of a prompt's n draws from seed + i: choices differ, and each is reproducible
        alone or in any batch."""
        seed = self.sampling.seed
        return None if seed is None else (seed + index % self.n) % (2**32)
