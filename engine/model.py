"""The loaded model as the rest of Orchard sees it: weights, tokenizer, limits."""
from __future__ import annotations

import logging
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
    # llguidance's view of the vocabulary (grammar-constrained output); None where it cannot be
    # built. Built beside the token table, for the same reason. Immutable once built.
    grammar_tokenizer: Any = None

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding (may exceed the tokenizer's size: padded rows)."""
        size = self.config.get("vocab_size") or (self.config.get("text_config") or {}).get("vocab_size")
        return int(size) if size else len(getattr(self.tokenizer, "_tokenizer", self.tokenizer))

    def build_text_tables(self) -> None:
        from engine.detokenizer import TokenTable

        hf_tokenizer = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
        self.token_table = TokenTable.build(hf_tokenizer)
        self.token_table_ready = True
        try:
            from engine.grammar import build_grammar_tokenizer

            self.grammar_tokenizer = build_grammar_tokenizer(hf_tokenizer, self.eos_token_ids)
        except Exception as exc:  # structured output is then refused with a clear 400
            logging.getLogger("orchard.engine").warning("no grammar support for this tokenizer: %s", exc)


def context_length_of(config: dict) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config")
    return context_length_of(text) if isinstance(text, dict) else 2048
