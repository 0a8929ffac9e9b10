"""Tiny random models for tests: mlx-lm targets (llama, qwen3) and DFlash drafts, float32.

Targets are saved in the mlx-lm layout (config.json + model.safetensors) and drafts in the
published DFlash layout, so loaders are exercised exactly as with real checkpoints.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from engine.model.draft import DFlash2Draft, DFlashDraft, DraftConfig, save_draft

# MLX CUDA's float32 matmuls round like TF32: on an H200 two float32 paths that agree to 1e-6 on the CPU part by
# up to ~1e-3 (attention at 300 keys 7e-4; the packed draft against the published layout 1.5e-4)
FP32_ATOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3


def close_to_scale(got: mx.array, want: mx.array, tol: float = FP32_ATOL) -> bool:
    """max |got - want| within `tol` of want's largest magnitude: TF32-like rounding errs by a fraction of the
    operands, not of each output (a DFlash 2 draft's cycles parted by 2.4e-3 at outputs of 0.06, max 3)."""
    return (mx.abs(got - want).max() <= tol * mx.abs(want).max()).item()


def target_config(family: str = "qwen3", **overrides: Any) -> dict[str, Any]:
    """A small mlx-lm config.json for `family` ("llama" or "qwen3")."""
    config: dict[str, Any] = {
        "model_type": family,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 96,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    config.update(overrides)
    return config


def build_target(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """A random float32 mlx-lm model for `config` (mlx-lm's own init, seeded)."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    return model


def save_target(model: nn.Module, config: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_target(path: str | Path) -> nn.Module:
    model, _ = load_model(Path(path))
    return model


def draft_config(target: dict[str, Any], **overrides: Any) -> DraftConfig:
    """A 2-layer draft for `target` tapping layer 1 and the last (the spec's formula gives
    [1, 1] for 4-layer targets)."""
    fields: dict[str, Any] = {
        "hidden_size": target["hidden_size"],
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "num_target_layers": target["num_hidden_layers"],
        "target_layer_ids": (1, target["num_hidden_layers"] - 1),
        "mask_token_id": target["vocab_size"] - 1,
        "block_size": 4,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "vocab_size": target["vocab_size"],
    }
    fields.update(overrides)
    return DraftConfig(**fields)


def build_draft(config: DraftConfig, seed: int = 0) -> DFlashDraft:
    mx.random.seed(seed)
    draft = DFlashDraft(config)
    draft.update(tree_map(lambda p: p.astype(mx.float32), draft.parameters()))
    mx.eval(draft.parameters())
    return draft


DFLASH2 = {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 8, "selector_top_k": 6}


def build_draft2(config: DraftConfig, seed: int = 0, *, identity: bool = False, scale: float = 0.3) -> DFlash2Draft:
    """A float32 DFlash 2 draft: random backbone; conv and selector random too unless `identity`.

    Random conv/selector weights are drawn at `scale`, enough that the conv and the pair scores change
    what the draft proposes (a test that wants DFlash 1's behaviour passes identity=True).
    """
    if not config.is_dflash2:
        config = DraftConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, **DFLASH2})
    mx.random.seed(seed)
    draft = DFlash2Draft(config)
    draft.update(tree_map(lambda p: p.astype(mx.float32), draft.parameters()))
    if not identity:
        updates = []
        for i, (name, value) in enumerate(tree_flatten(draft.parameters())):
            if "_conv." in name or "candidate_selector." in name:
                noise = scale * mx.random.normal(value.shape, key=mx.random.key(seed * 1000 + i))
                updates.append((name, value + noise))
        draft.load_weights(updates, strict=False)
    mx.eval(draft.parameters())
    return draft


def save_tiny_draft(draft: DFlashDraft, path: str | Path) -> Path:
    save_draft(draft, path, dtype=mx.float32)
    return Path(path)


def plain_greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Reference greedy decoding on the raw mlx-lm model, one token per forward.

    Returns the tokens and the smallest top-1/top-2 logit gap seen: a gap near float32
    noise would make a token mismatch a tie rather than a bug.
    """
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[0, -1]
    tokens: list[int] = []
    min_gap = float("inf")
    while True:
        top2 = mx.sort(logits)[-2:]
        min_gap = min(min_gap, (top2[1] - top2[0]).item())
        tokens.append(int(mx.argmax(logits).item()))
        if len(tokens) == max_tokens:
            return tokens, min_gap
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[0, -1]


def random_qk_norms(layers: list[nn.Module]) -> None:
    """Give each layer's q_norm and k_norm its own random weight (seeded by position): norms that differ by head
    dimension and between queries and keys, where a fresh model's are all ones."""
    for i, layer in enumerate(layers):
        for j, norm in enumerate((layer.self_attn.q_norm, layer.self_attn.k_norm)):
            norm.weight = mx.random.uniform(0.5, 2.0, norm.weight.shape, key=mx.random.key(10 * i + j))


def assert_same_cached_logits(want_model: nn.Module, got_model: nn.Module, prompt: list[int], tol: float = 1e-5) -> None:
    """The two models' logits agree through their caches for a prompt, a decode row and a verify block."""
    caches = [make_prompt_cache(want_model), make_prompt_cache(got_model)]
    ids = mx.array([prompt])
    for chunk in (ids, ids[:, :1], ids[:, 2:6]):
        want, got = want_model(chunk, cache=caches[0]), got_model(chunk, cache=caches[1])
        assert mx.allclose(want, got, atol=tol, rtol=tol).item(), mx.abs(want - got).max().item()


def speculative_greedy(model: nn.Module, draft: DFlashDraft, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of our SpeculativeDecoder with a DFlash draft over `model`."""
    from engine.decode.drafters import DFlashDrafter
    from engine.decode.sampling import SamplingParams, TokenRng
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model.target import Target

    target = Target(model, draft.config.target_layer_ids)
    try:
        decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=draft.config.block_size)
        steps = decoder.generate(prompt, SamplingParams(temperature=0.0), max_tokens, TokenRng(0))
        return [t for step in steps for t in step.tokens]
    finally:
        target.close()
