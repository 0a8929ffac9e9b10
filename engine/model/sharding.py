"""Tensor-parallel sharding of a target with mlx-lm's own `Model.shard(group)`.

Column-split Q/K/V and gate/up, row-split o_proj and down_proj with an `all_sum` after each, so
every layer's output (the DFlash taps included) is identical on every rank.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

# heads that every rank must get an equal share of; qwen3_5 repeats KV heads itself when there are too few
_SPLIT_COUNTS = {"num_attention_heads": "attention heads", "num_key_value_heads": "key/value heads"}
_KV_REPEATING = ("qwen3_5", "qwen3_5_moe")


def shard_target(model: nn.Module, group: mx.distributed.Group) -> None:
    """Shard `model` in place over `group`, or raise ValueError in one line saying why it cannot be."""
    n = group.size()
    args = _text_args(model)
    family = args.get("model_type", type(model).__module__.rsplit(".", 1)[-1])
    if not hasattr(model, "shard"):
        raise ValueError(
            f"--tensor-parallel {n}: mlx-lm cannot shard {family} models (its Model has no shard()); "
            "llama, qwen2, qwen3, qwen3_5 and the other families with Model.shard can be split"
        )
    for key, what in _SPLIT_COUNTS.items():
        count = args.get(key)
        if key == "num_key_value_heads" and family in _KV_REPEATING:
            continue
        if count and count % n:
            raise ValueError(f"--tensor-parallel {n}: this {family} model's {count} {what} do not split into "
                             f"{n} equal parts; use a number of ranks that divides {count}")
    model.shard(group)


def _text_args(model: nn.Module) -> dict[str, Any]:
    found = getattr(model, "args", None)
    args = vars(found) if found is not None else {}
    return {**args, **(args.get("text_config") or {})}  # multimodal families nest the LM's dims
