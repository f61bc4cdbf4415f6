"""Grammar-constrained decoding with llguidance: the grammar tokenizer and a per-row logits processor.

Used on the engine thread. Grammar *strings* come from `app.generation.grammars` (pure string
building); this module turns them into token masks.

- `build_grammar_tokenizer(hf_tokenizer, eos_token_ids)`: an `llguidance.LLTokenizer` for the
  model's tokenizer. Build it once per model (~0.3 s for a 49k vocabulary) and share it: it is
  immutable and may be used from any thread (matcher construction and mask computation drop
  the GIL; the text-tokenize callback described below takes it back briefly).
- `make_processor(grammar, tokenizer, eos_token_ids, vocab_size)`: a `GrammarProcessor`, an
  mlx-lm logits processor for ONE batch row. It holds mutable matcher state: one per request,
  never shared, never reused.
- `grammar_error(grammar, tokenizer)`: None, or why the grammar is unusable (a warning, such as
  an unsupported JSON-schema keyword, counts as an error).

Non-special added tokens. llguidance's own Hugging Face import treats every added token that
looks like ``<...>`` as a special (control) token that grammar text can never produce. Qwen2.5
adds ``<tool_call>``/``</tool_call>`` with ``special=False``: they decode to text, and the model
writes its tool calls with them. For such tokenizers `build_grammar_tokenizer` rebuilds the
token table with those tokens as plain text bytes, and tokenizes text with the Hugging Face
tokenizer itself (so the canonical tokenization of ``"<tool_call>"`` is the single token, which
is what llguidance offers when the grammar forces that text; the ordinary pieces are accepted
too). Special added tokens (``<|im_end|>``, ...) stay control tokens: a JSON string can never
contain them.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable, Optional, Sequence

import llguidance.hf
import numpy as np
from llguidance import LLMatcher, LLParserLimits, LLTokenizer

log = logging.getLogger("orchard.engine")
__all__ = ["build_grammar_tokenizer", "GrammarProcessor", "grammar_error", "make_processor"]


def _hf_fast_tokenizer(tokenizer):
    """The transformers fast tokenizer inside `tokenizer` (mlx-lm's TokenizerWrapper, or itself)."""
    import transformers

    for candidate in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        if isinstance(candidate, transformers.PreTrainedTokenizerFast):
            return candidate
    raise ValueError(f"grammar decoding needs a fast Hugging Face tokenizer, got {type(tokenizer).__name__}")


def build_grammar_tokenizer(hf_tokenizer, eos_token_ids: Iterable[int]) -> LLTokenizer:
    """An llguidance tokenizer for `hf_tokenizer` (a transformers fast tokenizer, or mlx-lm's
    TokenizerWrapper around one) whose end-of-sequence tokens are `eos_token_ids` (the model's,
    all of them: a finished grammar allows exactly these).

    Takes a fraction of a second (0.3 s at 49k tokens); build once per model and share."""
    hf = _hf_fast_tokenizer(hf_tokenizer)
    eos = sorted({int(t) for t in eos_token_ids})
    if not eos:
        raise ValueError("grammar decoding needs at least one EOS token id")
    base = llguidance.hf.from_tokenizer(hf, eos_token=eos)
    backend = hf.backend_tokenizer
    text_added = {
        i: tok.content for i, tok in backend.get_added_tokens_decoder().items()
        if not tok.special and i < base.vocab_size and base.is_special_token(i)
    }
    if not text_added:
        return base
    return LLTokenizer(_TextAddedTokens(base, backend, text_added), eos_token=eos)


class _TextAddedTokens:
    """What `LLTokenizer(...)` reads from a Python tokenizer (the duck type of
    `llguidance.TokenizerWrapper`): every token's bytes, the special (control) token ids, and a
    text tokenizer. Token bytes come from llguidance's own import of the tokenizer, except the
    non-special added tokens, which become their text."""

    is_tokenizer_wrapper = True

    def __init__(self, base: LLTokenizer, backend, text_added: dict[int, str]):
        n = base.vocab_size
        self.tokens = [base.decode_bytes([i]) for i in range(n)]
        for i, content in text_added.items():
            self.tokens[i] = content.encode("utf-8")
        self.special_token_ids = [i for i in range(n) if i not in text_added and base.is_special_token(i)]
        self.eos_token_id = base.eos_token
        self.bos_token_id = None
        # A private copy: the engine's tokenizer object is not shared with llguidance's callback.
        # Special tokens written in grammar text are spelled as text (they are not text tokens),
        # while non-special added tokens still match as one token, as in the model's own output.
        self._backend = copy.copy(backend)
        self._backend.no_padding()
        self._backend.no_truncation()
        self._backend.encode_special_tokens = True

    def __call__(self, text) -> list[int]:
        # Called from Rust, which cannot take a Python exception: never raise.
        try:
            if isinstance(text, (bytes, bytearray)):
                text = bytes(text).decode("utf-8", errors="replace")
            return self._backend.encode(text, add_special_tokens=False).ids
        except Exception:  # noqa: BLE001 - an empty answer only disables token forcing here
            return []


def grammar_error(grammar: str, tokenizer: Optional[LLTokenizer] = None) -> Optional[str]:
    """None if `grammar` (an llguidance grammar string) is usable with `tokenizer`, else a
    readable reason. Warnings (e.g. "Unimplemented keys: [\"not\"]" for a JSON schema) count as
    errors: constrained output that silently ignores part of the schema would not match it."""
    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer, limits=LLParserLimits(verbose_errors=False))
    except Exception as e:  # noqa: BLE001 - malformed grammar text raises rather than reports
        return str(e) or type(e).__name__
    if is_error:
        return _terse(messages[0]) if messages else "invalid grammar"
    if messages:
        return "; ".join(_terse(m) for m in messages)
    return None


class GrammarProcessor:
    """An mlx-lm logits processor constraining one batch row to a grammar.

    Called as `processor(tokens, logits)` with the row's token history (1-D mx.array: the prompt
    on the first call, one more token, the one sampled at the previous step, on each later call)
    and its logits, shape (1, vocab). The first call consumes nothing; each later call feeds
    `tokens[-1]` to the matcher. Disallowed tokens, and padded embedding rows beyond the
    tokenizer's vocabulary, get -inf. Once the grammar is complete only the EOS ids are allowed.
    A matcher error (a token the grammar does not allow, a parser limit) ends the row: only EOS
    is allowed from then on (raising would fail every row of the batch's step).

    Per step: one `consume_token`, one mask computation into a preallocated numpy buffer (bit
    words), `np.unpackbits` of it, and one `mx.where` over the row.
    """

    def __init__(self, matcher: LLMatcher, tokenizer: LLTokenizer, eos_token_ids: Sequence[int],
                 vocab_size: int):
        self._matcher = matcher
        self._started = False
        self.failed = False  # the matcher errored: the row was ended with EOS
        self.vocab_size = int(vocab_size)
        n_tok = tokenizer.vocab_size
        if self.vocab_size < n_tok:
            raise ValueError(f"the model's vocabulary ({self.vocab_size}) is smaller than the tokenizer's ({n_tok})")
        self._eos = sorted({int(t) for t in eos_token_ids})
        if not self._eos or max(self._eos) >= n_tok or min(self._eos) < 0:
            raise ValueError(f"EOS ids {self._eos} are not tokens of the tokenizer (size {n_tok})")
        n_words = (self.vocab_size + 31) // 32
        # Bits for tokens >= the tokenizer's vocabulary (padded embedding rows) stay 0 forever.
        self._words = np.zeros(n_words, dtype=np.int32)
        self._tok_words = self._words[: (n_tok + 31) // 32]  # what llguidance writes (contiguous view)
        self._eos_words = _bit_words(self._eos, n_words)
        # Mid-grammar masks allow the tokenizer's EOS ids wherever the grammar may end; when
        # those differ from this row's (they should not: build the tokenizer with the model's),
        # they are swapped for this row's.
        tok_eos = sorted({int(t) for t in tokenizer.eos_tokens})
        self._eos_swap = None if tok_eos == self._eos else (~_bit_words(tok_eos, len(self._tok_words)),
                                                            self._eos_words[: len(self._tok_words)])

    @property
    def matcher(self) -> LLMatcher:
        return self._matcher

    def is_finished(self) -> bool:
        """The grammar is complete and nothing can extend it: only EOS may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"grammar {what}: {_terse(self._matcher.get_error()) or self._matcher.stop_reason()}")

    def mask_words(self) -> np.ndarray:
        """Compute the next token mask (int32 words, bit i of word w = token 32*w + i allowed).
        The returned array is reused: consume it before the next call."""
        m = self._matcher
        if m.is_stopped():
            if m.is_error():
                raise self._fail("error")
            return self._eos_words
        m.unsafe_compute_mask_ptr(self._tok_words.ctypes.data, self._tok_words.nbytes)
        if m.is_error():
            raise self._fail("error")
        if m.is_stopped():
            return self._eos_words
        if self._eos_swap is not None and m.is_accepting():
            keep, eos = self._eos_swap
            np.bitwise_and(self._tok_words, keep, out=self._tok_words)
            np.bitwise_or(self._tok_words, eos, out=self._tok_words)
        return self._words

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise self._fail(f"rejected token {int(token)}")

    def __call__(self, tokens, logits):
        import mlx.core as mx

        width = logits.shape[-1]
        if width > 32 * self._words.size:
            raise ValueError(f"logits are {width} wide; this processor was built for {self.vocab_size}")
        try:
            if self._started:
                self.consume(tokens[-1].item())
            words = self.mask_words()
        except ValueError as exc:
            # Raising here would fail the whole batch's step: end this row instead (EOS only).
            if not self.failed:
                log.error("grammar row ended early: %s", exc)
            self.failed, words = True, self._eos_words
        self._started = True
        # Unpacked on the host (a fresh array, copied into MLX now: the word buffer is reused).
        # On the CPU backend this beats unpacking in MLX (one element-wise pass instead of four).
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:width]
        return mx.where(mx.array(bits.view(np.bool_)), logits, -float("inf"))


def _bit_words(ids: Sequence[int], n_words: int) -> np.ndarray:
    words = np.zeros(n_words, dtype=np.uint32)
    for t in ids:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32)


def _terse(message: str) -> str:
    return message.replace("<non-verbose/>", "").strip()


def make_processor(grammar: str, tokenizer: LLTokenizer, eos_token_ids: Sequence[int],
                   vocab_size: int) -> GrammarProcessor:
    """A fresh `GrammarProcessor` for one request row. `vocab_size` is the model's logits width
    (may exceed the tokenizer's: the extra rows are always masked). Raises ValueError if the
    grammar is invalid (call `grammar_error` first to answer a client with the reason)."""
    # Terse errors: the default (verbose) ones carry the parser state and the whole grammar.
    matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=LLParserLimits(verbose_errors=False))
    if matcher.is_error():
        raise ValueError(f"invalid grammar: {_terse(matcher.get_error())}")
    return GrammarProcessor(matcher, tokenizer, eos_token_ids, vocab_size)
