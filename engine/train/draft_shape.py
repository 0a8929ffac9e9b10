"""What a new draft looks like: its shape from the target's, its mask token, its size."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from engine.model.draft import DraftConfig
from engine.model.target import Target


def draft_config_for(
    target: Target,
    model_args: Any,
    *,
    mask_token_id: int,
    num_layers: int = 3,
    num_taps: int | None = None,
    tap_layer_ids: tuple[int, ...] | None = None,
    intermediate_size: int | None = None,
    block_size: int = 16,
    max_position_embeddings: int = 8192,
) -> DraftConfig:
    """A draft shaped like one target layer (heads, head_dim, MLP width), `num_layers` deep.

    Taps default to the spec formula with one tap per draft layer (§1.3).
    """
    from engine.model.draft import build_target_layer_ids

    hidden = int(model_args.hidden_size)
    heads = int(model_args.num_attention_heads)
    taps = tap_layer_ids or build_target_layer_ids(target.num_layers, num_taps or num_layers)
    return DraftConfig(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(model_args, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(model_args, "head_dim", None) or hidden // heads),
        intermediate_size=int(intermediate_size or model_args.intermediate_size),
        num_target_layers=target.num_layers,
        target_layer_ids=tuple(taps),
        mask_token_id=mask_token_id,
        block_size=block_size,
        rms_norm_eps=float(getattr(model_args, "rms_norm_eps", 1e-6)),
        rope_theta=float(getattr(model_args, "rope_theta", 10000.0)),
        max_position_embeddings=max_position_embeddings,
        vocab_size=target.vocab_size,
    )


def choose_mask_token(tokenizer: Any, vocab_size: int) -> int:
    """A dedicated mask token if the vocabulary has one, else the last unused special token.

    SmolLM2 has no mask token; its specials are StarCoder-era markers (<jupyter_*>, <gh_stars>,
    <empty_output>, ...) that chat never produces, so the highest one (<empty_output>, 16) is free.
    """
    hf = getattr(tokenizer, "hf", None)
    vocab = hf.get_vocab() if hf is not None else {}
    for name in ("<|MASK|>", "<|mask|>", "<mask>", "[MASK]"):
        if name in vocab and vocab[name] < vocab_size:
            return int(vocab[name])
    busy = set(tokenizer.eos_token_ids) | {getattr(tokenizer, "bos_token_id", None)}
    probe = tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], add_generation_prompt=True
    )
    busy |= set(probe)
    free = sorted(i for i in tokenizer.special_token_ids if i not in busy and i < vocab_size)
    if not free:
        raise ValueError("no unused special token to serve as the mask token; pass --mask-token-id")
    return free[-1]


def count_parameters(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))
