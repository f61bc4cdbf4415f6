"""Architecture support: GGUF metadata -> config.json, tensor name mapping.

Only architectures whose mlx-lm model class matches llama.cpp's layout
one-to-one are listed; everything else is rejected up front.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UnsupportedGGUF
from .reader import GGUFHeader

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Tensor types mx.load understands. The first group arrives as MLX affine
# quantized triples (weight/scales/biases), the second is dequantized by MLX
# to float32 while loading; anything else makes mx.load fail.
NATIVE_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
DEQUANTIZED_BY_MLX = {"Q2_K", "Q4_K", "Q6_K"}
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
QUANT_GROUP_SIZE = 32  # every ggml block type MLX reads natively uses 32

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Parameter suffixes: GGUF "bias" is a Linear bias, MLX "scales"/"biases"
# are the affine quantization parameters produced by mx.load.
_SUFFIXES = ("weight", "bias", "scales", "biases")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.([a-z]+)$")
_GLOBAL_RE = re.compile(r"([a-z_]+)\.([a-z]+)$")


def check_supported(header: GGUFHeader) -> str:
    """Raise UnsupportedGGUF unless architecture and tensors are convertible.

    Returns the architecture name.
    """
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUF(
            f"unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    bad = sorted(
        {t.type_name for t in header.tensors.values()}
        - NATIVE_TYPES
        - DEQUANTIZED_BY_MLX
    )
    if bad:
        names = [t.name for t in header.tensors.values() if t.type_name in bad]
        raise UnsupportedGGUF(
            f"unsupported GGUF tensor type(s) {', '.join(bad)} "
            f"(e.g. tensor {names[0]!r}); MLX reads "
            f"{', '.join(sorted(NATIVE_TYPES | DEQUANTIZED_BY_MLX))}"
        )
    if "token_embd.weight" not in header.tensors:
        raise UnsupportedGGUF("GGUF has no token embedding tensor 'token_embd.weight'")
    if "rope_freqs.weight" in header.tensors:
        raise UnsupportedGGUF(
            "Llama 3.1-style RoPE frequency factors (tensor 'rope_freqs.weight')"
        )
    for name in header.tensors:
        hf_name(name)  # raises on tensors we would silently drop
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedGGUF(f"unsupported RoPE scaling type {scaling!r}")
    return arch


def hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to the mlx-lm parameter name."""
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, suffix = m.groups()
        if part in _BLOCK_NAMES and suffix in _SUFFIXES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"
    elif m := _GLOBAL_RE.match(gguf_name):
        part, suffix = m.groups()
        if part in _GLOBAL_NAMES and suffix in _SUFFIXES:
            return f"{_GLOBAL_NAMES[part]}.{suffix}"
    raise UnsupportedGGUF(f"unsupported GGUF tensor {gguf_name!r}")


def build_config(header: GGUFHeader) -> dict[str, Any]:
    """Build an mlx-lm/HF style config.json dict from GGUF metadata."""
    arch = header.architecture
    md = header.metadata

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedGGUF(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedGGUF(
            f"partial rotary embeddings (rope.dimension_count={rope_dims}, "
            f"head_dim={head_dim})"
        )
    vocab = header.tensors["token_embd.weight"].shape[0]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": vocab,
        # The converter undoes llama.cpp's q/k row permutation, so the
        # weights use the standard (HF, non-interleaved) RoPE layout.
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    if arch == "qwen2":
        # mlx-lm's qwen2 derives head_dim from hidden_size / heads.
        if head_dim * n_heads != hidden:
            raise UnsupportedGGUF(
                f"qwen2 with head_dim {head_dim} != hidden/heads"
            )
        config["use_sliding_window"] = False
    elif "blk.0.attn_q.bias" in header.tensors:
        config["attention_bias"] = True
    if md.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(get("rope.scaling.factor")),
        }
    for key, meta in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if (value := md.get(f"tokenizer.ggml.{meta}_token_id")) is not None:
            config[key] = int(value)
    return config
