"""engine/model/quant_linear.py and the loader's kept layers: a model on the quantized CPU kernel decodes
like MLX's quantized model within int8 rounding, and speculative greedy equals plain greedy through it."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import build_draft, build_target, draft_config, speculative_greedy, target_config

from engine.backend import cpu_quant
from engine.backend.cpu_quant import CpuQuant, KernelUnavailable
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.proposal_head import ProposalHead, head_matrix
from engine.decode.sampling import SamplingParams, TokenRng
from engine.model.fused import fuse_projections
from engine.model.gguf import to_float32
from engine.model.quant_linear import QuantEmbedding, QuantLinear, quantize_onto_kernel, supported, use_quant_kernel
from engine.model.transposed import TransposedLinear, transpose_linears

PROMPT = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> CpuQuant:
    try:
        cpu_quant.unsupported_here()
        ext: ModuleType = cpu_quant.load_extension(tmp_path_factory.mktemp("cpu_quant"))
    except KernelUnavailable as e:
        pytest.skip(f"the quantized CPU kernel cannot run here: {e}")
    return CpuQuant(ext, "test")


def quantized_pair(family: str = "llama", odd: str = "", odd_bits: int = 2, **overrides: object
                   ) -> tuple[nn.Module, nn.Module, dict]:
    """Two copies of a random target: 4-bit layers, an 8-bit embedding (a GGUF's Q4_1 / Q8_0 mix), and
    `odd_bits` for the modules under the path `odd`."""
    config = target_config(family, **overrides)

    def bits(path: str, module: nn.Module) -> dict | bool:
        if not hasattr(module, "to_quantized"):
            return False
        chosen = odd_bits if odd and path.startswith(odd) else 8 if isinstance(module, nn.Embedding) else 4
        return {"group_size": 32, "bits": chosen}

    models = []
    for _ in range(2):
        model = build_target(config, seed=3)
        nn.quantize(model, class_predicate=bits)
        mx.eval(model.parameters())
        models.append(model)
    return models[0], models[1], config


def greedy(model: nn.Module, prompt: list[int], n: int) -> list[int]:
    steps = PlainDecoder(model).generate(prompt, SamplingParams(temperature=0.0), n, TokenRng(0))
    return [t for step in steps for t in step.tokens]


def test_swap_counts_and_keeps_what_it_cannot_run(kernel: CpuQuant) -> None:
    _, model, _ = quantized_pair("qwen3", odd="model.layers.1.mlp", tie_word_embeddings=False)
    fuse_projections(model)
    assert not supported(model.model.layers[1].mlp.down_proj)  # 2-bit: not the kernel's
    swapped = use_quant_kernel(model, kernel)
    assert swapped == 4 * 4 - 2 + 1 + 1  # qkv, o, gate_up, down per layer (but two 2-bit), embedding, head
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert use_quant_kernel(model, kernel) == 0  # idempotent


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_logits_track_mlx_quantized_through_the_cache(kernel: CpuQuant, family: str) -> None:
    mlx_model, model, _ = quantized_pair(family)
    fuse_projections(model)
    assert use_quant_kernel(model, kernel) == 4 * 4 + 1  # tied: the embedding's as_linear is the head
    caches = [make_prompt_cache(mlx_model), make_prompt_cache(model)]
    ids = mx.array([PROMPT])
    for chunk in (ids, ids[:, :1], ids[:, 2:6]):
        want, got = mlx_model(chunk, cache=caches[0]), model(chunk, cache=caches[1])
        assert got.dtype == mx.float32 and got.shape == want.shape
        error = (mx.abs(want - got).mean() / mx.abs(want).mean()).item()
        assert error < 2e-3, error  # activation rounding; a wrong layout or scale is ~100%


def test_speculative_greedy_equals_plain_greedy_through_the_kernel(kernel: CpuQuant) -> None:
    _, model, config = quantized_pair("llama")
    fuse_projections(model)
    use_quant_kernel(model, kernel)
    draft = build_draft(draft_config(config), seed=5)
    want = greedy(model, PROMPT, 24)
    assert speculative_greedy(model, draft, PROMPT, 24) == want


def test_proposal_head_subset_is_the_heads_columns(kernel: CpuQuant) -> None:
    _, model, config = quantized_pair("llama")
    use_quant_kernel(model, kernel)
    head = head_matrix(model.model.embed_tokens.as_linear)
    assert isinstance(head, QuantEmbedding)
    ids = np.array([7, 3, 50, 11, 90], np.int32)
    proposal = ProposalHead(ids, head)
    hidden = mx.random.normal((3, config["hidden_size"]), key=mx.random.key(2))
    full = model.model.embed_tokens.as_linear(hidden)
    assert mx.array_equal(proposal.product(hidden), full[:, mx.array(ids)]).item()  # rows are computed alone
    with pytest.raises(ValueError, match="within the vocabulary"):
        ProposalHead(np.array([96], np.int32), head)


def test_lookups_dequantize_the_rows_in_the_models_dtype(kernel: CpuQuant) -> None:
    mlx_model, model, _ = quantized_pair("llama")
    use_quant_kernel(model, kernel, dtype=mx.float32)
    ids = mx.array([[1, 5, 9]])
    want = mlx_model.model.embed_tokens(ids).astype(mx.float32)
    got = model.model.embed_tokens(ids)
    assert got.dtype == mx.float32 and mx.array_equal(got, want).item()


def test_to_float32_keeps_the_kernels_layers() -> None:
    _, model, _ = quantized_pair("llama", odd="model.layers.0.mlp", odd_bits=3)  # 3-bit: dequantized
    to_float32(model, keep=supported)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    assert model.model.layers[1].self_attn.q_proj.scales.dtype == mx.float32
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert model.model.norm.weight.dtype == mx.float32


def test_a_float_draft_beside_a_kernel_target_runs_on_the_kernel_in_8_bits(kernel: CpuQuant) -> None:
    _, model, config = quantized_pair("llama")
    fuse_projections(model)
    draft = build_draft(draft_config(config), seed=5)
    transpose_linears(draft)  # as load_draft leaves it on the CPU
    assert quantize_onto_kernel(draft, build_target(config)) == 0  # a float target: the draft is left alone
    use_quant_kernel(model, kernel)
    swapped = quantize_onto_kernel(draft, model)
    layers = [m for _, m in draft.named_modules() if isinstance(m, QuantLinear)]
    assert swapped == len(layers) > 0 and all(m.bits == 8 for m in layers)
    assert not any(isinstance(m, TransposedLinear) for _, m in draft.named_modules())
    assert speculative_greedy(model, draft, PROMPT, 24) == greedy(model, PROMPT, 24)


def test_measured_verify_costs_are_keyed_by_the_kernel_build(kernel: CpuQuant, tmp_path: Path) -> None:
    """A rebuilt kernel (new source or MLX) must not price its cycles with an older build's costs."""
    from engine.model.loader import LoadedModel
    from engine.runtime.config import EngineConfig
    from engine.runtime.serving_model import cost_key

    _, model, _ = quantized_pair("llama")
    config = EngineConfig(model=str(tmp_path), drafter="ngram")
    plain_key = cost_key(LoadedModel(model, None, "tiny", tmp_path, 2048, "tiny"), config, "ngram")
    use_quant_kernel(model, kernel)
    key = cost_key(LoadedModel(model, None, "tiny", tmp_path, 2048, "tiny"), config, "ngram")
    assert f"cpu_quant {cpu_quant.build_key()}" in key and "cpu_quant" not in plain_key


def test_measured_verify_costs_are_keyed_by_the_engine_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade (any engine source changed) or compiled layers switched off must measure costs again."""
    from engine.model.loader import LoadedModel
    from engine.runtime import cost_cache
    from engine.runtime.config import EngineConfig
    from engine.runtime.serving_model import cost_key

    source = tmp_path / "engine"
    (source / "decode").mkdir(parents=True)
    (source / "decode" / "step.py").write_text("x = 1\n")
    before = cost_cache.engine_stamp(source)
    (source / "decode" / "step.py").write_text("x = 2\n")
    assert cost_cache.engine_stamp(source) != before
    _, model, _ = quantized_pair("llama")
    config = EngineConfig(model=str(tmp_path), drafter="ngram")
    key = cost_key(LoadedModel(model, None, "tiny", tmp_path, 2048, "tiny"), config, "ngram")
    assert f"engine {cost_cache.engine_stamp()} compiled layers True" in key
    monkeypatch.setenv("DFLASH_COMPILE_LAYERS", "0")
    assert cost_key(LoadedModel(model, None, "tiny", tmp_path, 2048, "tiny"), config, "ngram") != key


def test_a_verify_row_is_the_decode_step_bit_for_bit_on_the_embedded_model() -> None:
    """The embedded model as served on the kernel (products, attention, SwiGLU and norms all the kernel's,
    each row computed alone): every row of a 16-row verify equals the 1-row decode step at its position,
    logits and taps bit for bit, so speculative greedy decoding is plain greedy decoding exactly."""
    from engine.model.target import Target
    from engine.runtime.config import EngineConfig
    from engine.runtime.serving_model import load_target

    try:
        cpu_quant.unsupported_here()
    except KernelUnavailable as e:
        pytest.skip(f"the quantized CPU kernel cannot run here: {e}")
    loaded, prepared = load_target(EngineConfig())
    assert "SwiGLU and RMSNorm on the CPU kernel" in prepared, prepared
    target = Target(loaded.model, (1, 14, 27))
    ids = loaded.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    cache = target.make_cache()
    mx.eval(target(mx.array([ids]), cache, taps=True))
    block = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 16)]
    logits, taps = target(mx.array([block]), cache, taps=True)
    mx.eval(logits, taps)
    target.trim(cache, 16)
    for i, token in enumerate(block):
        one, one_taps = target(mx.array([[token]]), cache, taps=True)
        assert mx.array_equal(one[0, 0], logits[0, i]).item() and mx.array_equal(one_taps[0, 0], taps[0, i]).item(), i
