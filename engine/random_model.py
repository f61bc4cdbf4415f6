"""Write a Qwen2-architecture model folder with random weights: for tests and benchmarks.

`tiny` is small enough for CPU tests; the Qwen2.5 shapes match the real models'
configs, for benchmarking with LOAD_FORMAT=dummy (config and tokenizer only, weights
initialised in place) where no weights can be downloaded. The tokenizer is a small
byte-level BPE trained on a built-in text, with Qwen2.5-Instruct's chat template (tools
included) and, like Qwen2.5, `<tool_call>`/`</tool_call>` as non-special added tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5-Instruct's chat template, tools section included: the system turn lists the tools
# in <tools></tools> and asks for <tool_call> answers; assistant tool_calls render as
# <tool_call> blocks (arguments through `tojson`, so callers pass them as dicts); `tool`
# messages go inside <tool_response> in a user turn. One difference from the real one: the
# default system prompt stays "You are a helpful assistant." (Qwen's says "You are Qwen,
# created by Alibaba Cloud. ..."), so prompts without tools render as they always did here.
CHATML_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added after training, like Qwen2.5's: non-special tokens that decode to their text (so they
# show in decoded output) and are also spellable from ordinary BPE pieces.
TOOL_CALL_TOKENS = ["<tool_call>", "</tool_call>"]

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
    # A tiny model with Qwen2.5's 32k context and an 8k-token vocabulary (trained on Python's own
    # sources, so English and JSON tokenize ~3-4 characters a token): agents' 11-13k-token requests fit.
    "tiny-32k": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8192, max_position_embeddings=32768, tie_word_embeddings=True),
    # Heads of 64 (as Qwen2.5's): what the CUDA decode-attention kernel's tests need.
    "tiny-h64": dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=True),
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
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    merges = min(vocab_size, 400) if vocab_size <= 512 else vocab_size - 16  # room for the added tokens
    trainer = trainers.BpeTrainer(vocab_size=merges, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] if vocab_size <= 512 else _larger_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])
    tok.save(str(out_dir / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    tool_ids = [tok.token_to_id(t) for t in TOOL_CALL_TOKENS]
    added = ([(i, t, True) for i, t in zip(ids, SPECIAL_TOKENS)]
             + [(i, t, False) for i, t in zip(tool_ids, TOOL_CALL_TOKENS)])
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TEMPLATE,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "model_max_length": 32768, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": special, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, t, special in added},
    }, indent=2))
    assert ids == list(range(len(SPECIAL_TOKENS))), ids  # trainers put special tokens first
    assert len(SPECIAL_TOKENS) <= min(tool_ids) and max(tool_ids) < vocab_size, tool_ids
    return len(SPECIAL_TOKENS)


def make_terse(model_dir: Path, p_end: float = 0.15) -> Path:
    """Make a random model end its turns: one hidden feature made constant and large in every
    token's embedding, and a little larger in the end-of-turn token's. The final norm then sees
    it at every position and, with tied embeddings, every step ends the turn with probability
    about `p_end` (the rest stays random). Agents' tests need answers that end by themselves:
    Claude Code and Codex treat an answer cut by max_tokens as a failure. In place."""
    import math

    import mlx.core as mx

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if not config.get("tie_word_embeddings"):
        raise ValueError("make_terse needs tied embeddings")
    weights = mx.load(str(model_dir / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    # The feature dominates the norm: the final hidden state carries ~sqrt(hidden) of it.
    boost = math.log(p_end / (1 - p_end) * (vocab - 1)) / math.sqrt(hidden)
    embed[:, 0] = mx.full((vocab,), 4.0 * math.sqrt(hidden)).at[config["eos_token_id"]].add(boost)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return model_dir


def _larger_corpus(limit: int = 4_000_000):
    """Text for a larger vocabulary: the standard library's own sources (on every machine)."""
    import json as stdlib_json

    total = 0
    for path in sorted(Path(stdlib_json.__file__).resolve().parents[1].glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        total += len(text)
        yield text
        if total > limit:
            return


def _write_weights(out_dir: Path, config: dict, dtype: str, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    mx.save_safetensors(str(out_dir / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
