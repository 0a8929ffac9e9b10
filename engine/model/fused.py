"""Packed projections: a target's Q/K/V and gate/up matmuls fused into one each, at load time.

Small models are launch-bound on GPUs: one (H -> q+k+v) matmul does the work of three with one
dispatch and one read of the activations (on the CPU it saves a few percent). Fusion is a class swap, as
Target's taps are: a recognised attention or MLP module keeps its other children (norms, rope,
o_proj, down_proj) and gets a subclass whose `__call__` runs the packed projection and splits
it. Only module classes whose forward we have read are fused (exact type match); anything
else, e.g. qwen3_5's gated attention and Gated DeltaNet layers, is left untouched.
Concatenating along the output dim is exact for float weights and for quantized ones with the
same group size, bits and mode (every output row keeps its own scales and biases).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2, qwen3, qwen3_next
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache

from engine.backend import fast_exp
from engine.model.attention import block_attention
from engine.model.draft import MLP as DraftMLP
from engine.model.target import inner_model

# forwards read: q/k/v of the same x, optional per-head q_norm/k_norm, rope at cache.offset, sdpa, o_proj
_ATTENTION_CLASSES: tuple[type, ...] = (llama.Attention, qwen2.Attention, qwen3.Attention)
# forwards read: down_proj(swiglu(gate_proj(x), up_proj(x)))
_MLP_CLASSES: tuple[type, ...] = (llama.MLP, qwen2.MLP, qwen3.MLP, qwen3_next.Qwen3NextMLP, DraftMLP)
_FUSED_CLASSES: dict[type, type] = {}


def fuse_projections(model: nn.Module) -> int:
    """Fuse Q/K/V and gate/up of every recognised decoder layer of `model`, in place.

    Returns how many decoder layers had at least one module fused. Call it before any
    `mx.compile` of the model and before layer swaps such as engine/backend/verify_matmul.apply (it
    packs plain nn.Linear / nn.QuantizedLinear only); calling it twice fuses nothing new.
    """
    fused_layers = 0
    for layer in inner_model(model).layers:
        attn = _fuse_attention(getattr(layer, "self_attn", None))
        mlp = fuse_mlp(getattr(layer, "mlp", None))
        fused_layers += int(attn or mlp)
    return fused_layers


def is_fused(module: nn.Module) -> bool:
    return type(module) in _FUSED_CLASSES.values()


def _fuse_attention(attn: nn.Module | None) -> bool:
    if attn is None or type(attn) not in _ATTENTION_CLASSES or not pack_qkv(attn):
        return False
    attn.__class__ = _fused_class(type(attn), _fused_attention_call)
    return True


def pack_qkv(attn: nn.Module) -> bool:
    """Replace an attention module's q_proj / k_proj / v_proj by one `qkv_proj`, in place, with the split
    points as `_q_end` / `_k_end`; False (and nothing changed) where the three cannot be packed."""
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    packed = concat_linears(parts)
    if packed is None:
        return False
    q_dim, k_dim = _out_dims(parts[0]), _out_dims(parts[1])
    for name in ("q_proj", "k_proj", "v_proj"):
        delattr(attn, name)
    attn.qkv_proj = packed
    attn._q_end, attn._k_end = q_dim, q_dim + k_dim  # ints stay Python attributes, not parameters
    return True


def fuse_mlp(mlp: nn.Module | None) -> bool:
    """Pack a recognised MLP's gate and up projections into one `gate_up_proj`, in place."""
    if mlp is None or type(mlp) not in _MLP_CLASSES:
        return False
    parts = [mlp.gate_proj, mlp.up_proj]
    packed = concat_linears(parts)
    if packed is None:
        return False
    hidden = _out_dims(parts[0])
    delattr(mlp, "gate_proj")
    delattr(mlp, "up_proj")
    mlp.gate_up_proj = packed
    mlp._gate_up_split = hidden
    mlp.__class__ = _fused_class(type(mlp), _fused_mlp_call)
    return True


def concat_linears(parts: Sequence[nn.Module]) -> nn.Linear | nn.QuantizedLinear | None:
    """One linear layer whose output is the parts' outputs concatenated; None if incompatible."""
    first = parts[0]
    kind = type(first)
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(p) is not kind for p in parts):
        return None
    names = sorted(k for k, v in first.items() if isinstance(v, mx.array))
    for p in parts:
        same_arrays = sorted(k for k, v in p.items() if isinstance(v, mx.array)) == names
        if not same_arrays or any(p[n].dtype != first[n].dtype or p[n].shape[1:] != first[n].shape[1:] for n in names):
            return None
        if kind is nn.QuantizedLinear and _quant(p) != _quant(first):
            return None
    out_dims = sum(_out_dims(p) for p in parts)
    if kind is nn.Linear:
        packed: nn.Module = nn.Linear(first.weight.shape[1], out_dims, bias="bias" in first)
    else:
        in_dims = first.weight.shape[1] * 32 // first.bits
        group_size, bits, mode = _quant(first)
        packed = nn.QuantizedLinear(in_dims, out_dims, "bias" in first, group_size, bits, mode=mode)
    # the random init above stays an unevaluated graph: every array is replaced here
    packed.update({n: mx.concatenate([p[n] for p in parts], axis=0) for n in names})  # (sum out, ...)
    if kind is nn.QuantizedLinear and "biases" not in names:
        packed.biases = None  # modes without affine biases (mxfp4, ...)
    if not first.trainable_parameters():
        packed.freeze()
    mx.eval(packed.parameters())  # free the parts' memory now rather than at the first forward
    return packed


def _quant(linear: nn.QuantizedLinear) -> tuple[int, int, str]:
    return linear.group_size, linear.bits, getattr(linear, "mode", "affine")


def _out_dims(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])


def _fused_class(cls: type, call: Any) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"__call__": call, "__module__": cls.__module__})
    return _FUSED_CLASSES[cls]


def _fused_attention_call(
    self: nn.Module, x: mx.array, mask: mx.array | str | None = None, cache: Any | None = None
) -> mx.array:
    offset = 0 if cache is None else cache.offset
    queries, keys, values = project_qkv(self, x, lambda heads: self.rope(heads, offset=offset))
    return project_out(self, attend(self, queries, keys, values, mask, cache))


def attend(attn: nn.Module, queries: mx.array, keys: mx.array, values: mx.array, mask: mx.array | str | None,
           cache: Any | None) -> mx.array:
    """The rows' new keys and values into the cache, then the queries' attention over all of them: (B, nh, L, d)."""
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    if hasattr(cache, "bits"):  # a quantized KV cache: mlx-lm's quantized attention
        return scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attn.scale, mask=mask)
    start = cache.left_padding if isinstance(cache, BatchKVCache) else None  # a batched decode step's rows
    return block_attention(queries, keys, values, scale=attn.scale, mask=mask, prefill_on_host=True, site=attn,
                           key_start=start)


def project_out(attn: nn.Module, attended: mx.array) -> mx.array:
    """o_proj of the heads' outputs (B, nh, L, d) -> (B, L, H)."""
    B, _, L, _ = attended.shape
    return attn.o_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1))


def project_qkv(attn: nn.Module, x: mx.array, rotate: Callable[[mx.array], mx.array],
                qk_norm: QKNorm | None = None) -> tuple[mx.array, mx.array, mx.array]:
    """A packed attention module's queries, keys and values (B, heads, L, d) for x (B, L, H), the queries and
    keys through `rotate` (the module's RoPE at the rows' positions). `qk_norm`: a qwen3 module's q_norm and
    k_norm as one norm call (QKNorm; the queries and keys are then views of one rotated array)."""
    B, L, _ = x.shape
    qkv = attn.qkv_proj(x)  # (B, L, (nh + 2 nkv) * d)
    values = qkv[..., attn._k_end :].reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, nkv, L, d)
    if qk_norm is not None:
        heads = qk_norm(qkv.reshape(B, L, attn.n_heads + 2 * attn.n_kv_heads, -1))  # (B, L, nh + nkv, d)
        rotated = rotate(heads.transpose(0, 2, 1, 3))  # one RoPE call: query and key heads sit at the same rows
        return rotated[:, : attn.n_heads], rotated[:, attn.n_heads :], values
    if "q_norm" in attn:  # qwen3: per-head RMSNorm before rope
        queries, keys = mx.split(qkv[..., : attn._k_end], [attn._q_end], axis=-1)
        queries = attn.q_norm(queries.reshape(B, L, attn.n_heads, -1)).transpose(0, 2, 1, 3)  # (B, nh, L, d)
        keys = attn.k_norm(keys.reshape(B, L, attn.n_kv_heads, -1)).transpose(0, 2, 1, 3)  # (B, nkv, L, d)
        return rotate(queries), rotate(keys), values
    # one rope call for the query and key heads together (per-head, so exactly the same)
    heads = rotate(qkv[..., : attn._k_end].reshape(B, L, attn.n_heads + attn.n_kv_heads, -1).transpose(0, 2, 1, 3))
    return heads[:, : attn.n_heads], heads[:, attn.n_heads :], values


@dataclass(frozen=True)
class QKNorm:
    """A qwen3 attention's q_norm and k_norm as one RMSNorm call over all heads of the packed projection (the
    value heads' norms are computed and dropped) and one multiply by each head's own weight, after which one
    RoPE call rotates the query and key heads together: three launches a layer where the two norms and two
    RoPE calls take four, and six at more than one row (each norm first copies its strided part of the
    projection). On a GPU a launch costs more host time than these kernels take on the device. The result
    is rounded once more (after the norm, before the weight) than q_norm's and k_norm's own."""

    weight: mx.array  # (nh + nkv, d): q_norm's weight on each query head, k_norm's on each key head
    eps: float
    sources: tuple[mx.array, mx.array]  # the q_norm and k_norm weights it was built from
    # (d,) ones: under mx.compile MLX-CUDA 0.32.4 ran the norm without a weight at 43 us a call where this
    # takes 2.2 (H100, 8B-shape heads; the same values: x * 1 is exact)
    unit: mx.array

    def __call__(self, heads: mx.array) -> mx.array:
        """(B, L, nh + 2 nkv, d), the projection's heads -> the query and key heads normed, (B, L, nh + nkv, d)."""
        return mx.fast.rms_norm(heads, self.unit, self.eps)[:, :, : self.weight.shape[0]] * self.weight


def qk_norm_of(attn: nn.Module, cached: QKNorm | None = None) -> QKNorm | None:
    """The packed attention's QKNorm where its norms are plain RMSNorms of one eps (qwen3), else None;
    `cached` where it was built from the norms' current weights (a cast after loading replaces them)."""
    if cached is not None and cached.sources[0] is attn.q_norm.weight and cached.sources[1] is attn.k_norm.weight:
        return cached  # the packed draft asks every layer call: the checks below held when it was built
    if not all(type(attn.get(name)) is nn.RMSNorm for name in ("q_norm", "k_norm")) or "qkv_proj" not in attn:
        return None
    if attn.q_norm.eps != attn.k_norm.eps:
        return None
    q, k = attn.q_norm.weight, attn.k_norm.weight
    weight = mx.concatenate([mx.broadcast_to(q, (attn.n_heads, q.shape[0])),
                             mx.broadcast_to(k, (attn.n_kv_heads, k.shape[0]))])
    unit = mx.ones((q.shape[0],), dtype=q.dtype)
    mx.eval(weight, unit)
    return QKNorm(weight, attn.q_norm.eps, (q, k), unit)


def one_qk_norm() -> bool:
    """Whether compiled layers and packed drafts take QKNorm: by default on GPUs (a launch there costs more
    host time than these kernels take), not on the CPU (no gain measured on the embedded draft), or as
    set_one_qk_norm said."""
    return _one_qk_norm if _one_qk_norm is not None else mx.default_device() != mx.cpu


def set_one_qk_norm(on: bool | None) -> None:
    """Force QKNorm on or off (None: the default), e.g. to test it on the CPU. A compiled layer traces each route
    once and keeps the other's graphs (bench/regime.py --qknorm-ab switches it call by call)."""
    global _one_qk_norm
    _one_qk_norm = on


_one_qk_norm: bool | None = None


def _fused_mlp_call(self: nn.Module, x: mx.array) -> mx.array:
    return self.down_proj(fast_exp.packed_swiglu(self.gate_up_proj(x), self._gate_up_split))
