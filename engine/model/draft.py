"""The DFlash 1 and DFlash 2 draft models in the published layout (spec §1; DFlash 2: dflash2.md).

A small Qwen3-style stack with no embedding and no LM head of its own: the noise block is
embedded with the target's embedding, and every layer attends to the projected target taps
through its own k/v projections (KV injection, spec §1.5).

DFlash 2 (`DFlash2DraftModel`) adds two checkpoint-carried pieces (dflash2.md §2): a two-tap dynamic
depthwise convolution over the block rows around each attention and MLP sublayer, and a low-rank
pairwise selector that walks a chain over each slot's top-K candidates instead of taking each slot's
argmax. With the identity initialisation (conv tap 0 = 1, no dynamic part, successor codebook 0) a
DFlash 2 draft computes exactly what the DFlash 1 draft of the same backbone weights computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from engine.backend import fast_exp
from engine.model.attention import block_attention
from engine.model.gguf import (
    materialize,  # one per-layer loading bar for targets and drafts
)
from engine.model.compiled_norm import compile_norms
from engine.model.rope_table import use_table_rope
from engine.model.transposed import transpose_linears, untransposed_parameters

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
DFLASH1_ARCHITECTURE = "DFlashDraftModel"
DFLASH2_ARCHITECTURE = "DFlash2DraftModel"
# what marks a DFlash 2 config (dflash2.md §1.1), all four read from dflash_config first
DFLASH2_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
# module names never quantized: known exports keep them in bf16, and so do we (dflash2.md §4 item 8)
UNQUANTIZED_MODULES = ("attention_conv", "mlp_conv", "candidate_selector")
_MISSING = object()


def build_target_layer_ids(num_target_layers: int, num_taps: int) -> tuple[int, ...]:
    """Spec §1.3: spread from layer 1 to layer L-3; Python's banker's `round` is part of the format."""
    if num_taps == 1:
        return (num_target_layers // 2,)
    span = num_target_layers - 4
    return tuple(round(1 + i * span / (num_taps - 1)) for i in range(num_taps))


@dataclass(frozen=True)
class DraftConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # passed to mlx-lm's initialize_rope
    max_position_embeddings: int = 40960
    layer_types: tuple[str, ...] = ()  # empty: all full attention
    sliding_window: int | None = None
    is_causal: bool | None = None  # None: causal inside the block only for sliding layers
    final_logit_softcapping: float | None = None
    output_multiplier: float = 1.0
    input_embedding_scale: float = 1.0
    vocab_size: int | None = None  # DFlash 1: not used by the draft, written because loaders expect it
    # DFlash 2 (dflash2.md §1.1); all 0: a DFlash 1 draft
    conv_kernel_size: int = 0  # taps of the block-row convolution (self + predecessors)
    conv_group_size: int = 0  # channels sharing one dynamic coefficient
    selector_rank: int = 0  # width r of the selector's codebooks and gate
    selector_top_k: int = 0  # candidates K per slot

    @property
    def is_dflash2(self) -> bool:
        return any(getattr(self, key) for key in DFLASH2_KEYS)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one type per draft layer"
            )
        if unknown := set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}; use {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window in the draft config")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids is empty; the draft needs at least one tapped target layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (one anchor + drafts), got {self.block_size}")
        if self.is_dflash2:
            self._check_dflash2()

    def _check_dflash2(self) -> None:
        for key in DFLASH2_KEYS:
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ValueError(f"DFlash 2 draft: dflash_config.{key} must be a positive integer, got {value!r}")
        if self.hidden_size % self.conv_group_size:
            raise ValueError(
                f"DFlash 2 draft: dflash_config.conv_group_size {self.conv_group_size} does not divide "
                f"hidden_size {self.hidden_size}"
            )
        if self.vocab_size is None:
            raise ValueError("DFlash 2 draft: config.json needs vocab_size (the selector codebooks have one row per token)")
        if self.selector_top_k > self.vocab_size:
            raise ValueError(
                f"DFlash 2 draft: dflash_config.selector_top_k {self.selector_top_k} exceeds vocab_size {self.vocab_size}"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DraftConfig:
        """Read a draft config.json: `dflash_config` first, then the top level (spec §1.2).

        A DFlash 2 draft is one whose architectures name DFlash2DraftModel, or whose config has any of
        the four conv/selector keys (how SGLang and llama.cpp switch the modules on); it needs all four.
        """
        inner = config.get("dflash_config") or {}
        dflash2 = DFLASH2_ARCHITECTURE in (config.get("architectures") or []) or any(
            source.get(key) is not None for source in (inner, config) for key in DFLASH2_KEYS
        )

        def get(key: str, default: Any = _MISSING) -> Any:
            for source in (inner, config):
                if source.get(key) is not None:
                    return source[key]
            if default is _MISSING:
                raise ValueError(f"draft config.json is missing {key!r} (looked in dflash_config and at top level)")
            return default

        rope = get("rope_parameters", None) or get("rope_scaling", None)
        num_layers = int(get("num_hidden_layers"))
        num_heads = int(get("num_attention_heads"))
        num_target_layers = int(get("num_target_layers"))
        tap_ids = get("target_layer_ids", None)
        if tap_ids is None:
            tap_ids = build_target_layer_ids(num_target_layers, num_layers)
        dflash2_fields: dict[str, int] = {}
        if dflash2:
            for key in DFLASH2_KEYS:
                value = get(key, None)
                if value is None:
                    raise ValueError(f"DFlash 2 draft config.json is missing dflash_config.{key}")
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"DFlash 2 draft: dflash_config.{key} must be a positive integer, got {value!r}")
                dflash2_fields[key] = value
        return cls(
            hidden_size=int(get("hidden_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(get("num_key_value_heads", num_heads)),
            head_dim=int(get("head_dim", int(get("hidden_size")) // num_heads)),
            intermediate_size=int(get("intermediate_size")),
            num_target_layers=num_target_layers,
            target_layer_ids=tuple(tap_ids),
            mask_token_id=int(get("mask_token_id")),
            block_size=int(get("block_size", 16)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(get("rope_theta", (rope or {}).get("rope_theta", 10000.0))),
            rope_scaling=_nontrivial_rope(rope),
            max_position_embeddings=int(get("max_position_embeddings", 40960)),
            layer_types=tuple(get("layer_types", ())),
            sliding_window=get("sliding_window", None),
            is_causal=get("is_causal", None),
            final_logit_softcapping=get("final_logit_softcapping", None),
            output_multiplier=float(get("output_multiplier", 1.0)),
            input_embedding_scale=float(get("input_embedding_scale", 1.0)),
            vocab_size=get("vocab_size", None),
            **dflash2_fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """The published layout: a Qwen3 config plus `dflash_config` (what z-lab ships).

        DFlash 2 keeps block_size and the four conv/selector keys only inside dflash_config, as published.
        """
        top = {f.name: getattr(self, f.name) for f in fields(self)}
        inner_keys = (
            "mask_token_id", "target_layer_ids", "final_logit_softcapping",
            "output_multiplier", "input_embedding_scale",
        )
        if self.is_dflash2:
            inner_keys += ("block_size", *DFLASH2_KEYS)
        else:
            for key in DFLASH2_KEYS:
                del top[key]
        inner = {k: top.pop(k) for k in inner_keys}
        inner["target_layer_ids"] = list(inner["target_layer_ids"])
        top["layer_types"] = list(self.layer_types)
        top["use_sliding_window"] = SLIDING_ATTENTION in self.layer_types
        top = {k: v for k, v in top.items() if v is not None}
        inner = {k: v for k, v in inner.items() if v is not None}
        return {
            "architectures": [DFLASH2_ARCHITECTURE if self.is_dflash2 else DFLASH1_ARCHITECTURE],
            "model_type": "qwen3",
            "attention_bias": False,
            **top,
            "dflash_config": inner,
        }


def _nontrivial_rope(rope: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers>=5 writes {'rope_type': 'default', 'rope_theta': ...}: that is plain RoPE."""
    if not rope or (rope.get("rope_type") or rope.get("type", "default")) == "default":
        return None
    return dict(rope)


def rope_at(rope: nn.Module, x: mx.array, positions: int | mx.array) -> mx.array:
    """x: (b, heads, L, d). RoPE at absolute positions (spec §1.6).

    An int position is the first of a contiguous run (the fast path); an array gives each row's.
    """
    if isinstance(positions, int):
        return rope(x, offset=positions)
    # mx.fast.rope takes one offset per batch entry: make each row its own batch entry
    rows = x.transpose(2, 0, 1, 3)[..., None, :]  # (L, b, heads, 1, d)
    rows = rope(rows, offset=positions.astype(mx.int32))
    return rows[..., 0, :].transpose(1, 2, 0, 3)  # (b, heads, L, d)


def position_array(positions: int | mx.array, length: int) -> mx.array:
    if isinstance(positions, int):
        return mx.arange(positions, positions + length)
    return positions


def merge_masks(a: mx.array | None, b: mx.array | None) -> mx.array | None:
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == mx.bool_ and b.dtype == mx.bool_:
        return a & b

    def additive(m: mx.array) -> mx.array:
        return mx.where(m, 0.0, -mx.inf) if m.dtype == mx.bool_ else m

    return additive(a) + additive(b)


class DraftAttention(nn.Module):
    def __init__(self, config: DraftConfig, layer_idx: int) -> None:
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.scale = head_dim**-0.5
        sliding = config.layer_types[layer_idx] == SLIDING_ATTENTION
        self.window = config.sliding_window if sliding else None
        self.is_causal = sliding if config.is_causal is None else bool(config.is_causal)
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=config.rms_norm_eps)

    def _kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        b, n, _ = x.shape
        keys = self.k_norm(self.k_proj(x).reshape(b, n, self.n_kv_heads, -1))
        values = self.v_proj(x).reshape(b, n, self.n_kv_heads, -1)
        return keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)  # (b, n_kv_heads, n, head_dim)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        rope: nn.Module,
        ctx_positions: int | mx.array,
        q_positions: int | mx.array,
        cache: KVCache | None,
        mask: mx.array | None,
    ) -> mx.array:
        b, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(b, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        queries = rope_at(rope, queries, q_positions)  # (b, n_heads, L, head_dim)
        # the same k/v projections read the context and the block (no cross-attention weights)
        ctx_keys, ctx_values = self._kv(context)  # (b, n_kv_heads, S, head_dim)
        ctx_keys = rope_at(rope, ctx_keys, ctx_positions)
        block_keys, block_values = self._kv(x)  # (b, n_kv_heads, L, head_dim)
        block_keys = rope_at(rope, block_keys, q_positions)
        if cache is not None:
            # only context rows are cached; block K/V are recomputed, so the draft never rolls back
            ctx_keys, ctx_values = cache.update_and_fetch(ctx_keys, ctx_values)
            ctx_positions = 0
        keys = mx.concatenate([ctx_keys, block_keys], axis=2)  # (b, n_kv_heads, S+L, head_dim)
        values = mx.concatenate([ctx_values, block_values], axis=2)
        return self.attend(queries, keys, values, q_positions, ctx_positions, ctx_keys.shape[2], cache is not None, mask)

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, q_positions: int | mx.array,
               ctx_positions: int | mx.array, ctx_len: int, cached: bool, mask: mx.array | None) -> mx.array:
        """The block's queries (b, n_heads, L, head_dim) over keys and values (b, n_kv_heads, ctx_len + L,
        head_dim), the context's rows first, through o_proj: (b, L, hidden)."""
        b, _, L, _ = queries.shape
        if cached and self.window is not None and ctx_len > self.window - 1:
            # rows older than window-1 are out of every block row's window
            ctx_positions = ctx_len - (self.window - 1)
            keys, values = keys[:, :, ctx_positions:], values[:, :, ctx_positions:]
            ctx_len = self.window - 1
        structure = self._structural_mask(position_array(q_positions, L), position_array(ctx_positions, ctx_len))
        out = block_attention(
            queries, keys, values, scale=self.scale, mask=merge_masks(structure, mask)
        )  # (b, n_heads, L, head_dim)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, L, -1))

    def _structural_mask(self, q_pos: mx.array, ctx_pos: mx.array) -> mx.array | None:
        """(L, S+L) bool: the window over context keys, causality over block keys (spec §1.5)."""
        if not self.is_causal and self.window is None:
            return None  # full attention: bidirectional in the block, all context visible
        L, S = q_pos.shape[0], ctx_pos.shape[0]
        ctx_ok = mx.ones((L, S), dtype=mx.bool_)
        if self.window is not None:
            ctx_ok = (q_pos[:, None] - ctx_pos[None, :]) < self.window
        block_ok = mx.ones((L, L), dtype=mx.bool_)
        if self.is_causal:
            block_ok = q_pos[None, :] <= q_pos[:, None]
        return mx.concatenate([ctx_ok, block_ok], axis=1)


class MLP(nn.Module):
    """mlx-lm's qwen3 MLP (same parameter names) with engine/backend/fast_exp's SwiGLU on the CPU."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fast_exp.swiglu(self.gate_proj(x), self.up_proj(x)))


class DraftLayer(nn.Module):
    def __init__(self, config: DraftConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        rope: nn.Module,
        ctx_positions: int | mx.array,
        q_positions: int | mx.array,
        cache: KVCache | None,
        mask: mx.array | None,
        segment: int | None = None,  # DFlash 2's block-local conv only
    ) -> mx.array:
        attn = self.self_attn(self.input_layernorm(x), context, rope, ctx_positions, q_positions, cache, mask)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class GroupedDynamicConv(nn.Module):
    """DFlash 2's two-tap dynamic depthwise convolution over the block rows (dflash2.md §2.1).

    `kernel_projection(u)` of the normalised sublayer input u gives per-row coefficients D, read as
    [side, tap, group] (side 0: `prepare`, side 1: `finish`, both from u). Channel c, tap j, side s at
    row t weighs `base_kernel[s, j, c] + D[t, s, j, c // G]`, and
    `conv_s(v)_t = sum_j w[t, s, j] * v_{t-j}` with v_{t-j} = 0 before the block's first row: causal,
    depthwise, and block-local (nothing crosses a block or reaches the injected context).
    Initialised to the identity (tap 0 = 1, the rest and the projection 0).
    """

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.group_size = group_size
        self.groups = hidden_size // group_size
        base = mx.zeros((2, kernel_size, hidden_size))
        base[:, 0, :] = 1.0
        self.base_kernel = base  # (side, tap, channel): a bare tensor in the checkpoint
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * self.groups, bias=False)
        self.kernel_projection.weight = mx.zeros_like(self.kernel_projection.weight)

    def prepare(self, u: mx.array, segment: int | None = None) -> tuple[mx.array, mx.array]:
        """u (b, L, H) -> (conv_0(u), the coefficients `finish` takes: (b, L, K, H/G))."""
        dynamic = self.kernel_projection(u).reshape(*u.shape[:-1], 2, self.kernel_size, self.groups)
        return self.convolve(u, dynamic[..., 0, :, :], 0, segment), dynamic[..., 1, :, :]

    def finish(self, y: mx.array, dynamic: mx.array, segment: int | None = None) -> mx.array:
        return self.convolve(y, dynamic, 1, segment)

    def convolve(self, v: mx.array, dynamic: mx.array, side: int, segment: int | None) -> mx.array:
        """v (b, L, H), dynamic (b, L, K, H/G); rows are blocks of `segment` (None: one block of L)."""
        b, length, hidden = v.shape
        seg = length if segment is None else segment
        if length % seg:
            raise ValueError(f"{length} block rows are not a whole number of {seg}-row blocks")
        n = length // seg
        grouped = v.reshape(b, n, seg, self.groups, self.group_size)
        dynamic = dynamic.reshape(b, n, seg, self.kernel_size, self.groups, 1).astype(v.dtype)
        base = self.base_kernel[side].astype(v.dtype).reshape(self.kernel_size, self.groups, self.group_size)
        out = None
        for tap in range(min(self.kernel_size, seg)):  # a tap reaching before the block's first row adds 0
            shifted = grouped if tap == 0 else mx.concatenate(
                [mx.zeros_like(grouped[:, :, :tap]), grouped[:, :, : seg - tap]], axis=2
            )
            term = (base[tap] + dynamic[:, :, :, tap]) * shifted
            out = term if out is None else out + term
        return out.reshape(b, length, hidden)


class DFlash2Layer(DraftLayer):
    """x <- x + finish_a(attn(prepare_a(LN1 x))); x <- x + finish_m(mlp(prepare_m(LN2 x))) (dflash2.md §2.1)."""

    def __init__(self, config: DraftConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        dim = config.hidden_size
        self.attention_conv = GroupedDynamicConv(dim, config.conv_kernel_size, config.conv_group_size)
        self.mlp_conv = GroupedDynamicConv(dim, config.conv_kernel_size, config.conv_group_size)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        rope: nn.Module,
        ctx_positions: int | mx.array,
        q_positions: int | mx.array,
        cache: KVCache | None,
        mask: mx.array | None,
        segment: int | None = None,
    ) -> mx.array:
        # the conv output feeds q and the block's k/v; the injected context is never convolved
        u, dynamic = self.attention_conv.prepare(self.input_layernorm(x), segment)
        attn = self.self_attn(u, context, rope, ctx_positions, q_positions, cache, mask)
        h = x + self.attention_conv.finish(attn, dynamic, segment)
        u, dynamic = self.mlp_conv.prepare(self.post_attention_layernorm(h), segment)
        return h + self.mlp_conv.finish(self.mlp(u), dynamic, segment)


class CandidateSelector(nn.Module):
    """DFlash 2's pairwise path selector (dflash2.md §2.2), replacing each slot's argmax.

    Slot t keeps the top-K ids C_t of its unary logits U_t (the transformed draft logits, float32);
    `S_t(a, b) = U_t(b) + sum_k A[a, k] g_t[k] B[b, k]` with g_t = hidden_projection(h_t),
    A = predecessor_codebook, B = successor_codebook, a the token chosen at slot t-1 (the anchor for
    slot 1). The walk picks slot by slot: greedy argmax, or a draw from softmax(S/T) over the K.
    Initialised as NeMo does: A ~ N(0, 0.02), B = 0, so every score starts as the unary logit (argmax).
    """

    def __init__(self, hidden_size: int, vocab_size: int, rank: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)
        self.predecessor_codebook = 0.02 * mx.random.normal((vocab_size, rank))  # bare tensors in the checkpoint
        self.successor_codebook = mx.zeros((vocab_size, rank))

    def candidates(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """(..., V) float32 -> top-K ids (..., K) int32 (in no particular order) and their logits."""
        ids = mx.stop_gradient(top_k_ids(mx.stop_gradient(logits), self.top_k))  # the choice has no gradient
        return ids, mx.take_along_axis(logits, ids, axis=-1)

    def pair_scores(self, hidden: mx.array, predecessors: mx.array, candidates: mx.array) -> mx.array:
        """The bilinear term: hidden (..., H), predecessors (..., P), candidates (..., K) -> (..., P, K) float32."""
        gate = self.hidden_projection(hidden).astype(mx.float32)  # (..., r)
        pred = self.predecessor_codebook[predecessors].astype(mx.float32) * gate[..., None, :]  # (..., P, r)
        succ = self.successor_codebook[candidates].astype(mx.float32)  # (..., K, r)
        return pred @ mx.swapaxes(succ, -1, -2)

    def lattice(self, hidden: mx.array, logits: mx.array, anchor: int | mx.array) -> tuple[mx.array, mx.array]:
        """Every slot's scores for every predecessor candidate (the walk needs no further model pass).

        hidden (k, H) final-normed draft rows of slots 1..k, logits (k, V) their unary logits, anchor
        the block's slot-0 token. Returns candidates (k, K) int32 and scores (k, K, K) float32, where
        scores[t, i, j] = S_t(C_{t-1}[i], C_t[j]); slot 1's rows all use the anchor.
        """
        ids, unary = self.candidates(logits)  # (k, K)
        first = mx.full((1, self.top_k), anchor, dtype=mx.int32) if isinstance(anchor, int) \
            else mx.broadcast_to(anchor.astype(mx.int32).reshape(1, 1), (1, self.top_k))
        predecessors = mx.concatenate([first, ids[:-1]], axis=0)  # (k, K)
        return ids, unary[:, None, :] + self.pair_scores(hidden, predecessors, ids)


TOP_K_CHUNK = 64


def top_k_ids(logits: mx.array, k: int, chunk: int = TOP_K_CHUNK) -> mx.array:
    """(..., V) -> the ids (..., k) int32 of k largest entries, in no particular order.

    MLX's CPU argpartition over a whole vocabulary row is slow (15 rows of 49,152: 5.4 ms, against 0.75 ms
    for their argmax); so the row is cut into chunks of `chunk`, and the k chunks with the largest maxima,
    which hold every top-k entry (a chunk holding one has a max among the top k, and at most k chunks do),
    are searched: 0.77 ms, and 3.0 ms instead of 33 ms for a 248,320 vocabulary (bench/selector_walk.py).
    """
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    if vocab < 4 * chunk * k:
        return mx.argpartition(logits, kth=vocab - k, axis=-1)[..., vocab - k :].astype(mx.int32)
    rows = logits.reshape(-1, vocab)
    n = -(-vocab // chunk)
    if n * chunk != vocab:
        rows = mx.concatenate([rows, mx.full((rows.shape[0], n * chunk - vocab), -mx.inf, dtype=rows.dtype)], axis=-1)
    blocks = rows.reshape(rows.shape[0], n, chunk)
    best = mx.argpartition(blocks.max(axis=-1), kth=n - k, axis=-1)[:, n - k :]  # (R, k) chunk indices
    ids = (best[:, :, None] * chunk + mx.arange(chunk)).reshape(rows.shape[0], k * chunk)
    values = mx.take_along_axis(blocks, best[:, :, None], axis=1).reshape(rows.shape[0], k * chunk)
    pick = mx.argpartition(values, kth=k * chunk - k, axis=-1)[:, k * chunk - k :]
    return mx.take_along_axis(ids, pick, axis=-1).astype(mx.int32).reshape(*lead, k)


def walk_lattice(scores: mx.array, noise: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """The selector's greedy chain over a lattice, lazily on the device (no host sync).

    scores (k, K, K) as CandidateSelector.lattice (already divided by the temperature when sampling),
    noise (k, K) Gumbel noise per slot and candidate or None (greedy). Slot t takes
    argmax_j scores[t, i, j] + noise[t, j] with i its predecessor's index. Returns each slot's chosen
    index (k,) and its predecessor's index (k,) (slot 1's: 0, all of its rows being the anchor's).
    """
    z = scores if noise is None else scores + noise[:, None, :]
    best = mx.argmax(z, axis=-1).astype(mx.int32)  # (k, K): the choice at slot t after each predecessor
    chosen = [best[0, 0]]
    for t in range(1, best.shape[0]):
        chosen.append(mx.take(best[t], chosen[-1]))
    picked = mx.stack(chosen)
    return picked, mx.concatenate([mx.zeros((1,), dtype=mx.int32), picked[:-1]])


class DFlashDraft(nn.Module):
    """Module names equal the published safetensors keys (spec §1.9)."""

    layer_class: type[DraftLayer] = DraftLayer

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = [self.layer_class(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rope = initialize_rope(
            config.head_dim,
            base=config.rope_theta,
            traditional=False,
            scaling_config=config.rope_scaling,
            max_position_embeddings=config.max_position_embeddings,
        )

    def project_context(self, taps: mx.array) -> mx.array:
        """(b, n, T*H) -> (b, n, H): fuse the tapped target layers (spec §1.4)."""
        return self.hidden_norm(self.fc(taps))

    def noise_embedding(self, ids: mx.array, embed: Callable[[mx.array], mx.array]) -> mx.array:
        """(b, L) -> (b, L, H). `embed` is the target's (with its own embed scale, as REF-MLX)."""
        return embed(ids) * self.config.input_embedding_scale

    def __call__(
        self,
        noise: mx.array,
        context: mx.array,
        *,
        cache: list[KVCache] | None = None,
        q_offset: int | mx.array,
        ctx_positions: mx.array | None = None,
        mask: mx.array | None = None,
        block_size: int | None = None,
    ) -> mx.array:
        """Final-normed hidden states (b, L, H) for all L noise rows.

        Inference: noise (1, B, H), context = the new projected rows (1, n, H) (n may be 0),
        `cache` from make_cache() gets their K/V; block rows sit at q_offset..q_offset+B-1.
        Training: cache=None, context (b, S, H) at `ctx_positions` (default arange(S)), noise
        (b, N*B, H) at `q_offset` (an (N*B,) array of absolute positions), and `mask` (bool or
        additive, broadcastable to (b, heads, N*B, S+N*B)) saying which keys each row sees.
        block_size: rows per block, for DFlash 2's block-local conv (None: the L rows are one block).
        """
        if cache is not None:
            assert ctx_positions is None, "with a cache, context rows follow the cached ones"
            ctx_pos: int | mx.array = cache[0].offset
        else:
            ctx_pos = 0 if ctx_positions is None else ctx_positions
        if isinstance(q_offset, mx.array) and q_offset.ndim == 0:
            q_offset = q_offset + mx.arange(noise.shape[1])
        h = noise
        for i, layer in enumerate(self.layers):
            h = layer(h, context, self.rope, ctx_pos, q_offset, None if cache is None else cache[i], mask, block_size)
        return self.norm(h)

    def logits(self, hidden: mx.array, lm_head: Callable[[mx.array], mx.array]) -> mx.array:
        """(…, H) -> (…, V) float32 through the target's LM head (spec §1.7)."""
        logits = lm_head(hidden).astype(mx.float32)
        if self.config.output_multiplier != 1.0:
            logits = logits * self.config.output_multiplier
        if cap := self.config.final_logit_softcapping:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def make_cache(self) -> list[KVCache]:
        # plain KVCache for sliding layers too: attention reads only the last window-1 rows
        return [KVCache() for _ in self.layers]


class DFlash2Draft(DFlashDraft):
    """The DFlash 1 draft plus a conv around each sublayer and the candidate selector (dflash2.md §2)."""

    layer_class = DFlash2Layer

    def __init__(self, config: DraftConfig) -> None:
        if not config.is_dflash2:
            raise ValueError("DFlash2Draft needs a DFlash 2 config (conv_kernel_size, conv_group_size, "
                             "selector_rank, selector_top_k)")
        super().__init__(config)
        assert config.vocab_size is not None  # checked by the config
        self.candidate_selector = CandidateSelector(
            config.hidden_size, config.vocab_size, config.selector_rank, config.selector_top_k
        )

    @classmethod
    def wrapping(cls, draft: DFlashDraft, **dflash2: int) -> DFlash2Draft:
        """An identity DFlash 2 around a DFlash 1 draft's weights: it drafts exactly what `draft` drafts.

        dflash2: the four DFlash 2 config values (default 2, 16, 256, 16, clipped to the shapes).
        """
        config = draft.config
        assert config.vocab_size is not None, "the DFlash 1 config needs vocab_size to size the codebooks"
        group = dflash2.get("conv_group_size", 16)
        values = {
            "conv_kernel_size": 2,
            "conv_group_size": group if config.hidden_size % group == 0 else 1,
            "selector_rank": 256,
            "selector_top_k": min(16, config.vocab_size),
            **dflash2,
        }
        from engine.model.packed_draft import is_packed, pack_draft, unpacked_parameters

        wrapped = cls(replace(config, **values))
        wrapped.load_weights(unpacked_parameters(draft), strict=False)  # the conv and selector keep their init
        if is_packed(draft):  # a loaded draft is: so is its wrapper
            pack_draft(wrapped)
        return wrapped


def make_draft(config: DraftConfig) -> DFlashDraft:
    """A freshly initialised draft of the config's kind (DFlash 2: identity conv and selector)."""
    return DFlash2Draft(config) if config.is_dflash2 else DFlashDraft(config)


def quantizable(path: str, module: nn.Module) -> bool:
    """nn.quantize's class_predicate for drafts: DFlash 2's conv and selector stay unquantized."""
    return hasattr(module, "to_quantized") and not any(part in UNQUANTIZED_MODULES for part in path.split("."))


def load_draft(
    path: str | Path,
    *,
    target_hidden_size: int,
    target_vocab_size: int,
    target_num_layers: int,
) -> DFlashDraft:
    """Load a published DFlash 1 or DFlash 2 draft (config.json + *.safetensors) checked against its target."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in draft directory {path}")
    raw = json.loads(config_file.read_text())
    config = DraftConfig.from_dict(raw)
    _check_against_target(config, target_hidden_size, target_vocab_size, target_num_layers)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in draft directory {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
        weights.update(mx.load(str(file)))
    if quantized := sorted(k for k in weights if k.endswith(".scales") and any(
            part in UNQUANTIZED_MODULES for part in k.split("."))):
        raise ValueError(
            f"draft checkpoint quantizes {quantized[0][: -len('.scales')]}; DFlash 2's conv and selector "
            "weights must stay unquantized (bf16 or float32)"
        )
    draft = make_draft(config)
    if quantization := raw.get("quantization"):
        nn.quantize(
            draft,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda name, module: f"{name}.scales" in weights and quantizable(name, module),
        )
    _check_keys(weights, draft)
    draft.load_weights(list(weights.items()))
    draft.eval()
    # float32 on the CPU backend, as the target: its bf16 matmuls skip BLAS (one draft MLP over a
    # 16-row block took 16.9 ms in bf16, 2.3 ms in float32 with OpenBLAS)
    on_cpu = mx.default_device() == mx.cpu
    draft = materialize(draft, dequantize=on_cpu, desc=f"loading draft {Path(path).name}" + (" (to float32)" if on_cpu else ""))
    from engine.model.packed_draft import pack_draft  # it builds on this module's layers

    pack_draft(draft)  # before the CPU's layer swaps below: they take the packed layers
    if on_cpu:  # as the target: transposed, table RoPE, compiled norms (transposed.py, rope_table.py, compiled_norm.py)
        transpose_linears(draft)
        use_table_rope(draft)
        compile_norms(draft)
    return draft


def _check_against_target(config: DraftConfig, hidden: int, vocab: int, num_layers: int) -> None:
    if config.hidden_size != hidden:
        raise ValueError(
            f"draft hidden_size {config.hidden_size} != target hidden_size {hidden}: "
            "a DFlash draft must be trained for this target"
        )
    if not 0 <= config.mask_token_id < vocab:
        raise ValueError(f"draft mask_token_id {config.mask_token_id} is outside the target vocabulary (0..{vocab - 1})")
    if config.vocab_size is not None and config.vocab_size != vocab:
        raise ValueError(f"draft vocab_size {config.vocab_size} != target vocab size {vocab}")
    if bad := [i for i in config.target_layer_ids if not 0 <= i < num_layers]:
        raise ValueError(f"draft target_layer_ids {bad} are out of range for a {num_layers}-layer target")
    if config.num_target_layers != num_layers:
        raise ValueError(f"draft num_target_layers {config.num_target_layers} != target layers {num_layers}")


def _check_keys(weights: dict[str, mx.array], draft: DFlashDraft) -> None:
    if own := sorted(k for k in weights if k.startswith(("lm_head.", "embed_tokens.", "model.embed_tokens."))):
        raise ValueError(
            f"draft checkpoint has its own {own[0]}; DFlash drafts share the target's embedding "
            "and LM head (spec §1.1), so this is not a DFlash 1 draft"
        )
    expected = {k for k, _ in tree_flatten(draft.parameters())}
    if missing := sorted(expected - weights.keys()):
        raise ValueError(f"draft checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected := sorted(weights.keys() - expected):
        raise ValueError(f"draft checkpoint has {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    params = dict(tree_flatten(draft.parameters()))
    if wrong := [k for k in expected if weights[k].shape != params[k].shape]:
        k = wrong[0]
        raise ValueError(f"draft tensor {k} has shape {weights[k].shape}, the config implies {params[k].shape}")


def save_draft(draft: DFlashDraft, path: str | Path, dtype: mx.Dtype = mx.bfloat16) -> None:
    """Write config.json + model.safetensors in the published layout."""
    from engine.model.packed_draft import unpacked_parameters

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # a loaded draft is packed, and on the CPU stores its matrices transposed
    weights = {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in unpacked_parameters(draft)
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    config = draft.config.to_dict()
    quantized = [m for _, m in draft.named_modules() if isinstance(m, nn.QuantizedLinear)]
    if quantized:
        config["quantization"] = {"group_size": quantized[0].group_size, "bits": quantized[0].bits}
    config["torch_dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(dtype, "float32")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


__all__ = [
    "DraftConfig", "DFlashDraft", "DFlash2Draft", "CandidateSelector", "GroupedDynamicConv", "walk_lattice",
    "build_target_layer_ids", "load_draft", "make_draft", "quantizable", "save_draft",
    "FULL_ATTENTION", "SLIDING_ATTENTION", "DFLASH2_KEYS",
]
