"""Incremental detokenization, run on request greenlets (never on the engine thread).

For byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM) every token maps
to a fixed byte string: a table built once per model turns a token into bytes
with one lookup, and an incremental UTF-8 decoder holds back split characters.
Other vocabularies fall back to decoding a short window of ids each time.
"""
from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's reversible byte<->unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTable:
    """token id -> bytes for byte-level BPE tokenizers; special tokens map to b''."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    @classmethod
    def build(cls, hf_tokenizer) -> Optional["TokenTable"]:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        if decoder is None or type(decoder).__name__ != "ByteLevel":
            return None
        u2b = _unicode_to_byte()
        special = set(getattr(hf_tokenizer, "all_special_ids", []) or [])
        added = {i for i, t in getattr(hf_tokenizer, "added_tokens_decoder", {}).items() if t.special}
        skip = special | added
        vocab_size = len(hf_tokenizer)
        tokens = hf_tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        pieces = []
        for i, tok in enumerate(tokens):
            if i in skip or tok is None:
                pieces.append(b"")
            elif all(ch in u2b for ch in tok):
                pieces.append(bytes(u2b[ch] for ch in tok))
            else:  # added non-special tokens are stored as plain text
                pieces.append(tok.encode("utf-8"))
        return cls(pieces)


class Detokenizer:
    """Turns a growing list of token ids into text deltas."""

    def __init__(self, hf_tokenizer, table: Optional[TokenTable]):
        self._tokenizer = hf_tokenizer
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._ids: list[int] = []
        self._prefix = 0  # fallback path: window start
        self._read = 0  # fallback path: ids already turned into text

    def add(self, token_ids: list[int]) -> str:
        if self._table is not None:
            pieces = self._table.pieces
            n = len(pieces)
            data = b"".join(pieces[t] if t < n else b"" for t in token_ids)
            return self._utf8.decode(data)
        self._ids.extend(token_ids)
        return self._window_delta()

    def flush(self) -> str:
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._read = len(self._ids)
        return after[len(before):]

    def _window_delta(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if after.endswith("\ufffd"):
            return ""  # a character is still split across tokens
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
