"""engine/model/scale_dtype.py: float32 scales for quantized layers under float32 activations, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tiny_models import build_target, target_config

from engine.model.fused import fuse_projections
from engine.model.loader import load_model
from engine.model.scale_dtype import activations_dtype, widen_scales

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]


def gguf_like(seed: int = 2) -> nn.Module:
    """A tiny llama laid out as a GGUF loads: float16 scales in every quantized layer (the embedding too),
    float32 norms."""
    model = build_target(target_config("llama", hidden_size=64, head_dim=16), seed=seed)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=32, bits=4)
    for _, module in model.named_modules():
        if isinstance(module, nn.RMSNorm):
            module.weight = module.weight.astype(mx.float32)
    mx.eval(model.parameters())
    return model


def logits(model: nn.Module) -> mx.array:
    return model(mx.array([PROMPT]))


def test_widened_scales_give_the_same_logits_bit_for_bit() -> None:
    model = gguf_like()
    fuse_projections(model)
    before = logits(model)
    assert before.dtype == mx.float32 and activations_dtype(model) == mx.float32
    assert widen_scales(model) == 4 * len(model.model.layers)  # qkv, o, gate_up, down
    layer = model.model.layers[0]
    assert layer.mlp.gate_up_proj.scales.dtype == mx.float32 and layer.mlp.gate_up_proj.biases.dtype == mx.float32
    assert model.model.embed_tokens.scales.dtype == mx.float16  # its lookup would round differently
    assert mx.array_equal(logits(model), before).item()
    assert widen_scales(model) == 0  # nothing left to widen


def test_narrow_activations_are_left_alone() -> None:
    model = build_target(target_config("llama", hidden_size=64, head_dim=16), seed=3)
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=32, bits=4)
    assert activations_dtype(model) is None
    assert widen_scales(model) == 0
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16


def test_the_embedded_gguf_keeps_its_logits() -> None:
    model = load_model("embedded", dequantize=False).model
    fuse_projections(model)
    before = logits(model)
    widened = widen_scales(model)
    assert widened == 4 * len(model.model.layers)
    assert mx.array_equal(logits(model), before).item()


def test_a_widened_bfloat16_draft_drafts_bit_for_bit() -> None:
    """A bfloat16 draft beside float32 activations: float32 weights at load give the same hidden rows."""
    from tiny_models import build_draft, draft_config

    from engine.decode.drafters import DFlashDrafter
    from engine.model.scale_dtype import widen_draft
    from engine.model.target import Target

    model = gguf_like()
    cfg = target_config("llama", hidden_size=64, head_dim=16)
    dcfg = draft_config(cfg, block_size=8)
    target = Target(model, dcfg.target_layer_ids)
    _, taps = target(mx.array([PROMPT]), None, taps=True)
    rows = []
    for widen in (False, True):
        draft = build_draft(dcfg, seed=3)
        draft.set_dtype(mx.bfloat16)
        if widen:
            assert widen_draft(draft, model) > 0
            assert {v.dtype for _, v in tree_flatten(draft.parameters())} == {mx.float32}
        drafter = DFlashDrafter(draft, target)
        drafter.begin(PROMPT, taps)
        rows.append(drafter._forward([PROMPT[-1]], None, 7)[0])
    assert mx.array_equal(rows[0], rows[1]).item()
    narrow = build_target(cfg, seed=2)
    narrow.set_dtype(mx.bfloat16)  # bfloat16 activations: the draft is left as it is
    draft = build_draft(dcfg, seed=3)
    draft.set_dtype(mx.bfloat16)
    assert widen_draft(draft, narrow) == 0 and draft.norm.weight.dtype == mx.bfloat16
    target.close()
