"""Packed draft layers: one product for a draft layer's q/k/v over its context and block rows, one for gate/up.

A DFlash draft layer reads the new context rows through the same k/v projections as its block rows
(spec §1.4). As published, a layer runs five projections (q of the block; k and v of the context and of
the block), three RoPE calls and two concatenations of cached and block keys. A draft forward is bound
by how many ops it launches (a GPU's host) or runs (MLX's CPU backend), not by its arithmetic, so at load
the draft is packed (inference only: training builds the published modules):
- the context and block rows go through one [q; k; v] product (the context rows' queries are not used);
- the keys take one RoPE call, the block's positions following the context's, as a cycle feeds them;
- the block's keys and values are written to the draft cache with the context's and fetched with them,
  then dropped again (the cache's offset moves back: the next context rows overwrite them), so the
  keys need no concatenation;
- gate and up are one product (engine/model/fused.py's MLP packing).
The arithmetic is the published layer's: each output row is the same dot products over the same weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from engine.model.draft import DFlashDraft, DraftAttention, position_array, rope_at
from engine.model.fused import QKNorm, fuse_mlp, one_qk_norm, pack_qkv, project_qkv, qk_norm_of
from engine.model.transposed import untransposed_parameters

__all__ = ["PackedDraftAttention", "is_packed", "pack_draft", "unpacked_parameters"]


class PackedDraftAttention(DraftAttention):
    """DraftAttention with q/k/v as one `qkv_proj` over [context; block] rows (see the module docstring)."""

    _q_end: int
    _k_end: int

    def __call__(self, x: mx.array, context: mx.array, rope: nn.Module, ctx_positions: int | mx.array,
                 q_positions: int | mx.array, cache: KVCache | None, mask: mx.array | None) -> mx.array:
        b, L, _ = x.shape
        n = context.shape[1]
        rows = mx.concatenate([context, x], axis=1) if n else x
        contiguous = isinstance(ctx_positions, int) and isinstance(q_positions, int) and q_positions == ctx_positions + n
        if contiguous and one_qk_norm() and (qk_norm := self._one_norm()) is not None:
            # fused.QKNorm: the context rows' queries are rotated too and dropped (a few rows of one kernel)
            queries, keys, values = project_qkv(self, rows, lambda t: rope_at(rope, t, ctx_positions), qk_norm)
            queries = queries[:, :, n:]
            return self._attend_cached(queries, keys, values, q_positions, ctx_positions, n, L, cache, mask)
        qkv = self.qkv_proj(rows)  # (b, n+L, (nh + 2 nkv) d)
        queries = qkv[:, n:, : self._q_end].reshape(b, L, self.n_heads, -1)
        keys = qkv[:, :, self._q_end : self._k_end].reshape(b, n + L, self.n_kv_heads, -1)
        values = qkv[:, :, self._k_end :].reshape(b, n + L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = rope_at(rope, self.q_norm(queries).transpose(0, 2, 1, 3), q_positions)
        keys = self.k_norm(keys).transpose(0, 2, 1, 3)  # (b, nkv, n+L, d)
        if contiguous:
            keys = rope_at(rope, keys, ctx_positions)  # a cycle's block follows its context rows: one run
        else:
            keys = rope_at(rope, keys, mx.concatenate([position_array(ctx_positions, n), position_array(q_positions, L)]))
        return self._attend_cached(queries, keys, values, q_positions, ctx_positions, n, L, cache, mask)

    def _attend_cached(self, queries: mx.array, keys: mx.array, values: mx.array, q_positions: int | mx.array,
                       ctx_positions: int | mx.array, n: int, L: int, cache: KVCache | None,
                       mask: mx.array | None) -> mx.array:
        """Attention over the context's and the block's keys (b, nkv, n+L, d), through the cache if any."""
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
            cache.offset -= L  # only context rows stay cached: the block is recomputed every cycle
            return self.attend(queries, keys, values, q_positions, 0, keys.shape[2] - L, True, mask)
        return self.attend(queries, keys, values, q_positions, ctx_positions, n, False, mask)

    def _one_norm(self) -> QKNorm | None:
        self._qk_norm = qk_norm_of(self, getattr(self, "_qk_norm", None))  # a dataclass: not a parameter
        return self._qk_norm


def _pack_attention(attn: nn.Module) -> bool:
    if type(attn) is not DraftAttention or not pack_qkv(attn):
        return False
    attn.__class__ = PackedDraftAttention
    return True


def pack_draft(draft: DFlashDraft) -> int:
    """Pack every draft layer's q/k/v and gate/up in place (float or quantized alike); returns how many
    layers were packed. Inference only; `unpacked_parameters` gives the published names back."""
    packed = 0
    for layer in draft.layers:
        attention = _pack_attention(layer.self_attn)
        packed += int(fuse_mlp(layer.mlp) or attention)
    return packed


def is_packed(draft: DFlashDraft) -> bool:
    return any(type(layer.self_attn) is PackedDraftAttention for layer in draft.layers)


def unpacked_parameters(draft: DFlashDraft) -> list[tuple[str, mx.array]]:
    """The draft's (name, array) pairs in the published layout: every packed product split back into its
    parts (rows of weight, scales and biases alike: each output row keeps its own), and matrices the CPU
    stores transposed turned back (engine/model/transposed.py)."""
    splits: dict[str, list[tuple[str, int, int]]] = {}
    for i, layer in enumerate(draft.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is PackedDraftAttention:
            splits[f"layers.{i}.self_attn.qkv_proj."] = [
                (f"layers.{i}.self_attn.q_proj.", 0, attn._q_end),
                (f"layers.{i}.self_attn.k_proj.", attn._q_end, attn._k_end),
                (f"layers.{i}.self_attn.v_proj.", attn._k_end, -1)]
        if "gate_up_proj" in mlp:
            splits[f"layers.{i}.mlp.gate_up_proj."] = [
                (f"layers.{i}.mlp.gate_proj.", 0, mlp._gate_up_split), (f"layers.{i}.mlp.up_proj.", mlp._gate_up_split, -1)]
    out = []
    for name, value in untransposed_parameters(draft):
        prefix = name[: name.rfind(".") + 1]
        if prefix not in splits:
            out.append((name, value))
            continue
        leaf = name[len(prefix):]
        for part, start, end in splits[prefix]:
            out.append((part + leaf, value[start : value.shape[0] if end < 0 else end]))
    return out
