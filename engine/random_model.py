"""Write a Qwen2-architecture model folder with random weights: for tests and benchmarks.

`tiny` is small enough for CPU tests; the Qwen2.5 shapes match the real models'
configs, for benchmarking with LOAD_FORMAT=dummy (config and tokenizer only, weights
initialised in place) where no weights can be downloaded. The tokenizer is a small
byte-level BPE trained on a built-in text, with Qwen2.5's ChatML template.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       tie_word_embeddings=False),
}

_CORPUS = (
    "The capital of France is Paris. Hello world! What is the capital of Germany? Berlin is.\n"
    "Orchard serves language models on Apple silicon with continuous batching and streaming.\n"
    "A quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>.,;:!?'\" \n"
) * 4


def write_random_model(out_dir: Path, shape: str = "tiny", *, weights: bool = True,
                       dtype: str = "float32", seed: int = 0, tokenizer_from: Path | None = None) -> Path:
    """`tokenizer_from`: copy a real tokenizer (and size the vocabulary to it), so random
    tokens decode to real text pieces, as benchmarks need."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape_config = dict(SHAPES[shape])
    if tokenizer_from is not None:
        eos, shape_config["vocab_size"] = _copy_tokenizer(Path(tokenizer_from), out_dir)
    else:
        eos = _write_tokenizer(out_dir, shape_config["vocab_size"]) - 1  # <|im_end|>
    config = dict(shape_config, model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6,
                  rope_theta=1000000.0, torch_dtype=dtype, eos_token_id=eos, bos_token_id=None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if weights:
        _write_weights(out_dir, config, dtype, seed)
    return out_dir


def _copy_tokenizer(source: Path, out_dir: Path) -> tuple[int, int]:
    """(eos id, vocabulary size) of the copied tokenizer."""
    import shutil

    from tokenizers import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out_dir / name)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    eos_name = json.loads((out_dir / "tokenizer_config.json").read_text()).get("eos_token") or "<|im_end|>"
    eos_name = eos_name["content"] if isinstance(eos_name, dict) else eos_name
    return tok.token_to_id(eos_name), tok.get_vocab_size()


def _write_tokenizer(out_dir: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, t in zip(ids, SPECIAL_TOKENS)},
    }, indent=2))
    assert ids == list(range(len(SPECIAL_TOKENS))), ids  # trainers put special tokens first
    return len(SPECIAL_TOKENS)


def _write_weights(out_dir: Path, config: dict, dtype: str, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.save_safetensors(str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
