"""A prompt batch made for a server's engine loop, and the model's output head, through which a
prompt's last prefill pass samples its first token (engine/batcher.py, the batching core, uses
both).

Split off the batching core so that each module keeps one job: this one is everything about a
prefill pass (bucketed lengths, right padding, queued evaluation, the host-side filter, and the
projection of only the completed rows' last positions); the batcher decides which rows pass
and where they go after.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import KVCache

# Architectures whose forward pass is exactly: inner model, then the output projection (the
# tied embedding or lm_head). For these the last prefill pass of a prompt projects only its
# last position and samples the first token there (see SlotBatcher._prefill).
_PLAIN_HEADS = ("llama", "qwen2", "qwen3", "mistral", "ministral3")


class OutputHead:
    """A model split at its output projection: hidden states for a chunk, logits for a few rows."""

    def __init__(self, model):
        self.inner = model.model
        self._model = model

    def project(self, hidden: mx.array) -> mx.array:
        model = self._model
        if model.args.tie_word_embeddings:
            return model.model.embed_tokens.as_linear(hidden)
        return model.lm_head(hidden)


def output_head(model) -> Optional[OutputHead]:
    """The model's head, if its architecture is one whose forward pass is known to be exactly
    inner model then projection; None keeps the prompt's last token for a decode step."""
    args = getattr(model, "args", None)
    if getattr(args, "model_type", None) not in _PLAIN_HEADS or not hasattr(model, "model"):
        return None
    if not hasattr(args, "tie_word_embeddings") or not (args.tie_word_embeddings or hasattr(model, "lm_head")):
        return None
    return OutputHead(model)


class PromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, with its pass and its filter made for a server's engine loop.

    - **Bucketed lengths** (GPU). Every new (rows, length, context) shape of a prefill pass
      builds its attention kernel the first time on CUDA (50-140 ms against 7-15 ms warm on
      an H100; docs/benchmarks.md), and in a server prompt lengths never repeat. So each pass's
      length pads up to a multiple of `bucket` (a long prompt's last chunk: to a whole chunk);
      the start-up warm-up compiles those shapes.
      The padding goes in as right padding: the junk positions come after each row's real
      tokens (causal attention never sees them) and the cache's finalize rolls them to the
      left, where the left padding masks them from then on.
    - **No waiting.** mlx-lm evaluates a pass, rolls the padding, evaluates again and empties
      MLX's buffer cache; here the pass is queued (`async_eval`) and the engine goes on to
      build the next decode step while it runs: every op is on the one stream, so the next
      step's read-back orders everything. (Emptying the buffer cache made every later step
      allocate its buffers anew.)
    - **No read-back in `filter`.** mlx-lm's cache filter reads each layer's left padding back
      to trim the shared part: a host sync per layer, the first of which waits for the decode
      step in flight. Here the padding is known on the host: a row's KV state ends at the
      batch's last column and holds exactly its tokens."""

    bucket = 1
    head: Optional[OutputHead] = None  # set when the rows' first tokens come from their last pass

    def prompt(self, tokens, finishing=()):
        """Queue one pass over each row's next chunk. `finishing`: rows this chunk completes;
        returns their logits at their last real position (k, vocab), or None."""
        if not tokens:
            return None
        for kept, new in zip(self.tokens, tokens):
            kept += new
        lengths = [len(t) for t in tokens]
        target = max(lengths)
        if self.bucket > 1:
            target = -(-target // self.bucket) * self.bucket
            if self.prompt_cache and self.prompt_cache[0]._idx >= self.prefill_step_size > target:
                # A long prompt's last chunk pads to a whole chunk: its context stays a multiple
                # of the chunk, as the warm-up's long prompt had, instead of one of the many
                # (chunk length, context) pairs a partial chunk makes (a kernel build each).
                target = self.prefill_step_size
        padding = [target - n for n in lengths]
        if any(padding):
            for c in self.prompt_cache:
                c.prepare(lengths=lengths, right_padding=padding)
        inputs = mx.array([t + [0] * (target - len(t)) for t in tokens])
        logits = None
        if finishing and self.head is not None:
            # Only the completed rows' last positions are projected: the whole chunk's logits
            # would be a (rows, length, vocab) product, most of a pass's cost on the CPU.
            hidden = self.head.inner(inputs, cache=self.prompt_cache)
            last = hidden[mx.array(list(finishing)), mx.array([lengths[i] - 1 for i in finishing])]
            logits = self.head.project(last)
        else:
            self.model(inputs, cache=self.prompt_cache)
        if any(padding):
            for c in self.prompt_cache:
                c.finalize()
        mx.async_eval([c.state for c in self.prompt_cache])
        return logits

    def filter(self, keep):
        if not keep or not self.prompt_cache or self.prompt_cache[0].keys is None:
            return super().filter(keep)
        columns = self.prompt_cache[0]._idx
        shared = min(columns - len(self.tokens[i]) for i in keep)  # padding every kept row has
        index = mx.array(keep)
        for c in self.prompt_cache:
            c.keys, c.values = c.keys[index, :, shared:], c.values[index, :, shared:]
            c.offset, c.left_padding = c.offset[index], c.left_padding[index] - shared
            c._idx -= shared
        for name in ("uids", "tokens", "samplers", "logits_processors", "max_tokens", "stop_sequences"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def extract_cache(self, idx):
        """One row's KV state as plain caches, its padding known on the host as in `filter`
        (mlx-lm's extract reads every layer's padding back: a host sync per layer)."""
        if not self.prompt_cache or self.prompt_cache[0].keys is None:
            return super().extract_cache(idx)
        out = []
        for c in self.prompt_cache:
            start = c._idx - len(self.tokens[idx])
            layer = KVCache()
            layer.keys = mx.contiguous(c.keys[idx:idx + 1, :, start:c._idx])
            layer.values = mx.contiguous(c.values[idx:idx + 1, :, start:c._idx])
            layer.offset = layer.keys.shape[2]
            out.append(layer)
        return out
