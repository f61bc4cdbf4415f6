"""Embeddings (`/v1/embeddings`): one vector per input, pooled from the model's final hidden states.

Runs on the engine thread only: it calls the model. Inputs are sorted by length and run in
batches of at most `max_batch_tokens` padded tokens. Padding goes on the right: under a causal
mask a real position never attends to a later one, so padding leaves real positions' states as
they are alone, and pooling then reads real positions only.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

POOLINGS = ("last", "mean", "cls")
PAD_ID = 0  # any valid id: padded positions are never read


class Embedder:
    def __init__(self, model, pooling: str = "last", normalize: bool = True, max_batch_tokens: int = 8192):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self.pooling, self.normalize, self.max_batch_tokens = pooling, normalize, max_batch_tokens
        self._base = hidden_state_module(model)
        self._dimensions = self._hidden(mx.array([[PAD_ID]])).shape[-1]  # checks the base's output once, at load

    @property
    def dimensions(self) -> int:
        """The hidden size: the length of every vector."""
        return self._dimensions

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One float32 vector per input (token ids, non-empty), in input order."""
        if not all(inputs):
            raise ValueError("every input needs at least one token")
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        vectors: list = [None] * len(inputs)
        for batch in self._batches(order, inputs):
            for i, vector in zip(batch, self._embed_batch([inputs[i] for i in batch])):
                vectors[i] = vector
        return vectors

    def _batches(self, order: list[int], inputs: list[list[int]]):
        """Longest first, so a batch's padded size is its first input's length times its size."""
        start = 0
        while start < len(order):
            size = max(1, self.max_batch_tokens // len(inputs[order[start]]))
            yield order[start:start + size]
            start += size

    def _embed_batch(self, batch: list[list[int]]) -> list[np.ndarray]:
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        tokens = mx.array([list(ids) + [PAD_ID] * (width - len(ids)) for ids in batch])
        pooled = self._pool(self._hidden(tokens), mx.array(lengths))
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return list(np.array(pooled, dtype=np.float32))

    def _pool(self, hidden: mx.array, lengths: mx.array) -> mx.array:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            return hidden[mx.arange(hidden.shape[0]), lengths - 1]
        real = mx.arange(hidden.shape[1])[None] < lengths[:, None]
        return mx.where(real[..., None], hidden, 0.0).sum(axis=1) / lengths[:, None].astype(hidden.dtype)

    def _hidden(self, tokens: mx.array) -> mx.array:
        hidden = self._base(tokens)
        if not isinstance(hidden, mx.array) or hidden.ndim != 3 or hidden.shape[:2] != tokens.shape:
            raise TypeError(f"{type(self._base).__name__} does not return hidden states (batch, length, hidden)")
        return hidden.astype(mx.float32)


_WRAPPERS = ("language_model",)  # multimodal models keep the text model one level down
_BASES = ("model", "transformer", "backbone")  # the decoder without its LM head, by family


def hidden_state_module(model):
    """The part of an mlx-lm model that maps token ids to final-norm hidden states."""
    import mlx.nn as nn

    for name in _WRAPPERS:
        if isinstance(getattr(model, name, None), nn.Module):
            model = getattr(model, name)
    for name in _BASES:
        base = getattr(model, name, None)
        if isinstance(base, nn.Module):
            return base
    raise TypeError(f"{type(model).__module__}.{type(model).__name__} has no base module "
                    f"({', '.join(_BASES)}) to compute embeddings with")
