"""Rebuild a Hugging Face fast tokenizer from GGUF tokenizer metadata.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
supported; the pre-tokenizer is chosen from ``tokenizer.ggml.pre`` to match
what llama.cpp (and the original tokenizer.json) does for that model family.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

from .errors import UnsupportedGGUF
from .reader import GGUFHeader

# Token types from llama.cpp's llama_token_type.
_CONTROL, _USER_DEFINED = 3, 4

# Llama 3 splitting; Qwen2 is the same but splits digits one by one.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _byte_level(use_regex: bool) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for a ``tokenizer.ggml.pre`` value."""
    if pre in ("gpt2", "default"):
        return _byte_level(use_regex=True)
    if pre in ("smollm", "starcoder"):
        # StarCoder-family: every digit on its own, then GPT-2 splitting.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]
        )
    if pre in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                _byte_level(use_regex=False),
            ]
        )
    raise UnsupportedGGUF(f"unsupported tokenizer pre-tokenizer type {pre!r}")


def _token(md: dict[str, Any], key: str) -> int | None:
    value = md.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def build_tokenizer(header: GGUFHeader) -> Tokenizer:
    """Create a ``tokenizers.Tokenizer`` equivalent to the GGUF vocabulary."""
    md = header.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUF(
            f"unsupported tokenizer model {kind!r} (only byte-level BPE 'gpt2')"
        )
    tokens: list[str] = md.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise UnsupportedGGUF("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # duplicated padding entries keep the first id
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]

    pre = md.get("tokenizer.ggml.pre", "default")
    # Llama 3's tokenizer.json looks whole words up in the vocab before
    # merging (ignore_merges); the others apply merges only.
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in ("llama-bpe", "llama3"),
        )
    )
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()

    # Control tokens become special (skipped by decode(skip_special_tokens));
    # user-defined ones are matched verbatim but decoded like normal text.
    pairs = list(zip(tokens, types))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in pairs if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in pairs if ty == _USER_DEFINED]
    )

    tok.post_processor = _post_processor(md, tokens)
    return tok


def _post_processor(md: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    """BOS/EOS insertion as requested by tokenizer.ggml.add_{bos,eos}_token."""
    bos, eos = _token(md, "bos_token_id"), _token(md, "eos_token_id")
    prefix = [bos] if md.get("tokenizer.ggml.add_bos_token") and bos is not None else []
    suffix = [eos] if md.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if not prefix and not suffix:
        return processors.ByteLevel(trim_offsets=False)
    pre, post = [tokens[i] for i in prefix], [tokens[i] for i in suffix]
    return processors.TemplateProcessing(
        single=pre + ["$A"] + post,
        pair=pre + ["$A"] + post + [f"{t}:1" for t in pre] + ["$B:1"] + [f"{t}:1" for t in post],
        special_tokens=[(tokens[i], i) for i in dict.fromkeys(prefix + suffix)],
    )


def tokenizer_config(header: GGUFHeader, model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast."""
    md = header.metadata
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        idx = _token(md, key)
        if idx is not None and 0 <= idx < len(tokens):
            config[name] = tokens[idx]
    if template := md.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return config


def eos_token_ids(header: GGUFHeader) -> list[int]:
    """EOS plus end-of-turn ids (e.g. Llama 3's <|eot_id|>), deduplicated."""
    ids = [_token(header.metadata, k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return list(dict.fromkeys(i for i in ids if i is not None))
