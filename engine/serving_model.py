"""The model being served: target, tokenizer and the decoders built on them (loaded on the MLX thread)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from engine.config import EngineConfig
from engine.decoder import Decoder
from engine.plain_decoder import PlainDecoder

log = logging.getLogger("dflash.model")

SHIPPED_DRAFTS = Path(__file__).resolve().parent / "drafts"
# Drafts we train and ship, by the model id of their target.
DEFAULT_DRAFTS = {"SmolLM2-135M-Instruct": SHIPPED_DRAFTS / "smollm2-135m-instruct-dflash"}


@dataclass
class ServingModel:
    model_id: str
    tokenizer: object  # engine.tokenizer.Tokenizer
    context_length: int
    plain: Decoder
    speculative: Decoder | None
    drafter: str  # what /health reports: "dflash (<path>)", "ngram" or "none"
    backend: str
    description: str

    @classmethod
    def load(cls, config: EngineConfig) -> ServingModel:
        from engine.loader import load_model

        dequantize = {"auto": None, "yes": True, "no": False}[config.dequantize]
        loaded = load_model(config.model, dequantize=dequantize)
        plain = PlainDecoder(loaded.model, prefill_chunk=config.prefill_chunk)
        speculative, drafter = build_speculative(loaded, config)
        return cls(
            model_id=loaded.model_id,
            tokenizer=loaded.tokenizer,
            context_length=config.context_length or loaded.context_length,
            plain=plain,
            speculative=speculative,
            drafter=drafter,
            backend=describe_backend(),
            description=loaded.description,
        )


def resolve_draft(spec: str, model_id: str) -> str | None:
    if spec == "none":
        return None
    if spec == "default":
        path = DEFAULT_DRAFTS.get(model_id)
        if path is None or not (path / "config.json").is_file():
            log.warning("no DFlash draft is shipped for %s: decoding without one", model_id)
            return None
        return str(path)
    return spec


def build_speculative(loaded: object, config: EngineConfig) -> tuple[Decoder | None, str]:
    from engine.drafters import DFlashDrafter, NgramDrafter
    from engine.speculative import SpeculativeDecoder
    from engine.target import Target

    if config.drafter == "ngram":
        if config.draft not in ("default", "none"):
            raise ValueError("--drafter ngram takes no draft model; drop --draft")
        target = Target(loaded.model, layer_ids=())
        drafter = NgramDrafter()
        return SpeculativeDecoder(target, drafter, block_size=config.block_size, prefill_chunk=config.prefill_chunk), "ngram"
    path = resolve_draft(config.draft, loaded.model_id)
    if path is None:
        return None, "none"
    from engine.draft import load_draft

    draft = load_draft_for(path, loaded, load_draft)
    target = Target(loaded.model, layer_ids=draft.config.target_layer_ids)
    block_size = config.block_size or draft.config.block_size
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target), block_size=block_size, prefill_chunk=config.prefill_chunk)
    return decoder, f"dflash ({path})"


def load_draft_for(path: str, loaded: object, load_draft: object) -> object:
    from engine.loader import resolve_local_path

    local = resolve_local_path(path)
    args = loaded.model.args
    return load_draft(
        local,
        target_hidden_size=args.hidden_size,
        target_vocab_size=args.vocab_size,
        target_num_layers=args.num_hidden_layers,
    )


def describe_backend() -> str:
    device = mx.default_device()
    if device == mx.cpu:
        from engine.blas import blas_status

        return f"MLX {mx.__version__} CPU, {blas_status()}"
    if mx.metal.is_available():
        return f"MLX {mx.__version__} Metal"
    return f"MLX {mx.__version__} {device}"
