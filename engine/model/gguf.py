"""GGUF file -> mlx-lm model + Tokenizer, keeping MLX's native quantization (or dequantizing)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import get_total_parameters, infer_quant_config

from engine.model.progress import progress_bar
from engine.model.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp `general.file_type` values worth naming in a banner.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 12: "Q3_K_M", 14: "Q4_K_S", 15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_PARAM = ("weight", "scales", "biases", "bias")


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors (MLX-quantized where the file is Q4_0/Q4_1/Q8_0) and metadata as python values."""
    weights, meta = mx.load(str(path), return_metadata=True)
    return weights, {k: _to_python(v) for k, v in meta.items()}


def load_gguf(path: Path, *, dequantize: bool) -> tuple[nn.Module, Tokenizer, dict]:
    """Build an mlx-lm model and our Tokenizer from a GGUF file, weights loaded and evaluated.

    Returns (model, tokenizer, info) where info has architecture, context_length, quantization,
    num_parameters and name. `dequantize=True` gives plain float32 Linear/Embedding layers,
    the fast route on the CPU backend with a real BLAS.
    """
    model, tokenizer, info = build_gguf(path)
    materialize(model, dequantize=dequantize, desc=f"loading {path.name}")
    info["quantization"] = f"GGUF {info['file_type']} as {describe_weights(model)}"
    return model, tokenizer, info


def build_gguf(path: Path) -> tuple[nn.Module, Tokenizer, dict]:
    """The model with the file's weights assigned but not yet evaluated or dequantized (see materialize)."""
    weights, meta = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "use an mlx-lm / Hugging Face directory for other models."
        )
    tokenizer = Tokenizer.from_gguf_metadata(meta)  # fail fast on an unsupported vocabulary
    weights = {_mlx_name(k): v for k, v in weights.items()}
    model = _build_model(arch, meta, weights)
    _quantize_like(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    info = {
        "architecture": arch,
        "context_length": int(meta.get(f"{arch}.context_length") or 4096),
        "file_type": _file_type(meta),
        "num_parameters": get_total_parameters(model),
        "name": meta.get("general.name"),
    }
    return model, tokenizer, info


def materialize(model: nn.Module, *, dequantize: bool, desc: str, keep: Callable[[nn.Module], bool] | None = None
                ) -> nn.Module:
    """Evaluate the weights (and dequantize them to float32) one transformer layer at a time, in place.

    Layer by layer so the progress bar counts real work, and so dequantizing never holds the whole
    quantized and the whole float32 model at once (each layer's quantized weights go as it is done).
    Quantized layers for which `keep` is true stay quantized (engine/model/quant_linear.py runs them).
    """
    layers = list(getattr(model, "layers", None) or [])
    with progress_bar(total=len(layers) or 1, desc=desc, unit="layer") as bar:
        for layer in layers:
            if dequantize:
                to_float32(layer, keep)
            mx.eval(layer.parameters())
            bar.update(1)
        if dequantize:  # embeddings, final norm, head: the layers are float32 already
            to_float32(model, keep)
        mx.eval(model.parameters())
        if not layers:
            bar.update(1)
    return model


def to_float32(model: nn.Module, keep: Callable[[nn.Module], bool] | None = None) -> nn.Module:
    """Dequantize every quantized layer (but those `keep` picks) and cast all float parameters to float32,
    in place. Casting first makes the dequantized weights float32 too (not float16 from the scales); a
    kept layer's scales become float32, exactly."""
    model.set_dtype(mx.float32)
    layers = [(name, _dequantized(m)) for name, m in model.named_modules()
              if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding | QuantizedSwitchLinear)
              and not (keep is not None and keep(m))]
    if layers:
        model.update_modules(tree_unflatten(layers))
    return model


def _dequantized(module: nn.Module) -> nn.Module:
    """The float layer for one quantized layer (as mlx_lm.utils.dequantize_model swaps them)."""
    weight = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                           getattr(module, "mode", "affine"))
    if isinstance(module, nn.QuantizedEmbedding):
        plain: nn.Module = nn.Embedding(*weight.shape)
    elif isinstance(module, QuantizedSwitchLinear):  # (experts, out, in)
        plain = SwitchLinear(*weight.shape[::-1], bias="bias" in module)
    else:
        plain = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
    if "bias" in module:
        plain.bias = module.bias
    plain.weight = weight
    return plain


def _to_python(value: Any) -> Any:
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _mlx_name(name: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if m and m[2] in _LAYER and m[3] in _PARAM:
        return f"model.layers.{m[1]}.{_LAYER[m[2]]}.{m[3]}"
    head, _, param = name.partition(".")
    if head in _TOP_LEVEL and param in _PARAM:
        return f"{_TOP_LEVEL[head]}.{param}"
    # e.g. rope_freqs.weight (llama3 rope scaling) or MoE experts: refuse rather than run wrong.
    raise ValueError(
        f"GGUF tensor {name!r} is not supported (llama3-style rope_freqs, MoE experts and other extras "
        "are not); load the model's Hugging Face / mlx-lm directory instead."
    )


def _build_model(arch: str, meta: dict[str, Any], weights: dict[str, mx.array]) -> nn.Module:
    family = importlib.import_module(f"mlx_lm.models.{arch}")
    return family.Model(family.ModelArgs.from_dict(_model_config(arch, meta, weights)))


def _model_config(arch: str, meta: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    if "model.embed_tokens.weight" not in weights:
        raise ValueError("GGUF has no token_embd.weight tensor.")
    heads = key("attention.head_count")
    config = {
        "model_type": arch,
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": key("block_count"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "rope_theta": key("rope.freq_base", 10000.0 if arch == "llama" else 1e6),
        "max_position_embeddings": key("context_length", 4096),
        # llama.cpp permutes llama's Q/K rows into interleaved-pair rope; qwen2 keeps NeoX halves.
        "rope_traditional": arch == "llama",
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "rope_scaling": _rope_scaling(key("rope.scaling.type"), key("rope.scaling.factor")),
    }
    if arch == "llama":
        config["head_dim"] = key("attention.key_length")
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in weights
    missing = [k for k, v in config.items() if v is None and k not in ("rope_scaling", "head_dim")]
    if missing:
        raise ValueError(f"GGUF metadata lacks {arch} fields for {missing}.")
    return config


def _rope_scaling(kind: str | None, factor: float | None) -> dict | None:
    if kind in (None, "none"):
        return None
    if kind == "linear" and factor:
        return {"type": "linear", "factor": factor}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported; use the model's Hugging Face directory.")


def _quantize_like(model: nn.Module, weights: dict[str, mx.array]) -> None:
    # Each layer gets the bits/group the file stored for it (e.g. 4-bit blocks, 8-bit embedding).
    def predicate(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, class_predicate=predicate)


def _file_type(meta: dict[str, Any]) -> str:
    file_type = meta.get("general.file_type")
    if file_type is None:
        return "unknown type"
    return _FILE_TYPES.get(file_type, f"file_type {file_type}")


def describe_weights(model: nn.Module) -> str:
    """How the weights are held now, e.g. "MLX 4-bit/g32, 8-bit/g32" or "float32"."""
    layouts = sorted({(m.bits, m.group_size) for _, m in model.named_modules() if hasattr(m, "bits")})
    if layouts:
        return "MLX " + ", ".join(f"{b}-bit/g{g}" for b, g in layouts)
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters())})
    return "/".join(dtypes)
