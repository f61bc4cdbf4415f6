"""The loaded model as the rest of Orchard sees it: weights, tokenizer, limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoadedModel:
    model_id: str
    path: Path
    model: Any  # mlx.nn.Module; touch it on the engine thread only
    tokenizer: Any  # mlx-lm TokenizerWrapper; tokenizing is safe on request greenlets
    config: dict = field(default_factory=dict)
    context_length: int = 2048
    eos_token_ids: tuple[int, ...] = ()
    weight_bytes: int = 0
    dtype: str = ""
    created: int = 0
    # The detokenizer's byte table (None when the tokenizer is not byte-level BPE), built on the
    # engine thread at load time: it walks the whole vocabulary, too slow for the event loop.
    token_table: Any = None
    token_table_ready: bool = False

    def build_token_table(self) -> None:
        from engine.detokenizer import TokenTable

        self.token_table = TokenTable.build(getattr(self.tokenizer, "_tokenizer", self.tokenizer))
        self.token_table_ready = True


def context_length_of(config: dict) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config")
    return context_length_of(text) if isinstance(text, dict) else 2048
