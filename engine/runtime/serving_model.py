"""The model being served: target, tokenizer and the decoders built on them (loaded on the MLX thread)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from engine.backend.attention_kernel import default_kernel as default_attention_kernel
from engine.decode.batch import BatchDecoder
from engine.decode.decoder import Decoder
from engine.decode.plain_decoder import PlainDecoder
from engine.decode.prefix_cache import PrefixCache
from engine.runtime.config import EngineConfig
from engine.runtime.cost_cache import CostCache, Costs
from engine.runtime.pairs import default_draft_for, load_pairs

if TYPE_CHECKING:
    from engine.backend.cpu_quant import CpuQuant
    from engine.model.loader import LoadedModel
    from engine.decode.speculative import SpeculativeDecoder

log = logging.getLogger("dflash.model")
NGRAM_BLOCK_SIZE = 16  # the n-gram drafter has no block size of its own


@dataclass
class ServingModel:
    model_id: str
    tokenizer: object  # engine.model.tokenizer.Tokenizer
    context_length: int
    plain: Decoder
    speculative: Decoder | None
    drafter: str  # what /health reports: "dflash (<path>)", "ngram" or "none"
    backend: str
    description: str
    prefix_cache: PrefixCache | None = None  # None: every request prefills its whole prompt
    batch: BatchDecoder | None = None  # None: one request at a time (FIFO)
    max_batch: int = 1  # requests decoded at once
    batching: str = "off"  # what /health says about batching

    @classmethod
    def load(cls, config: EngineConfig, group: mx.distributed.Group | None = None) -> ServingModel:
        """Load on this thread; with a `group` of several ranks, this rank's shard of a tensor-parallel target."""
        pair = load_pairs().get(config.model)
        if pair is not None:  # a known pair's name stands for its target (and its draft by default)
            config = replace(config, model=pair.target)
        lockstep = group is not None and group.size() > 1
        # before the decoders are built: plain and speculative share the prepared model
        loaded, prepared = load_target(config, group)
        log.info("target: %s", prepared)
        plain = PlainDecoder(loaded.model, prefill_chunk=config.prefill_chunk)
        if lockstep and config.tree_budget != 0:
            log.warning("tree verification is not run under tensor parallel yet: verifying chains")
            config = replace(config, tree_budget=0)
        # lockstep ranks must choose the same verify widths: their controllers learn no costs from their
        # own clocks (engine/runtime/tensor_parallel.agree_on_costs); the prefix cache is off under TP
        speculative, drafter = build_speculative(loaded, config, learn_overheads=not lockstep)
        if speculative is not None and (not lockstep or gpu_kernels_on()):
            # lockstep ranks measure an agreed curve (tensor_parallel.agree_on_costs)
            on_cpu = mx.default_device() == mx.cpu and not lockstep
            warm_up(speculative, CostCache.default() if on_cpu else None, cost_key(loaded, config, drafter),
                    rehearse=mx.default_device() == mx.gpu and not lockstep)
        if on_cuda():
            warm_prefill([plain, *([] if speculative is None else [speculative])], config.prefill_chunk)
        batch, batching = build_batch(loaded.model, speculative, config, lockstep)
        if batch is not None and on_cuda():
            warm_batch(batch)
        return cls(
            model_id=loaded.model_id,
            tokenizer=loaded.tokenizer,
            context_length=config.context_length or loaded.context_length,
            plain=plain,
            speculative=speculative,
            drafter=drafter,
            backend=describe_backend() + (", quantized CPU kernel" if uses_quant_kernel(loaded.model) else "")
            + (f", tensor parallel over {group.size()} ranks" if lockstep else ""),
            description=loaded.description,
            prefix_cache=None if lockstep else build_prefix_cache(loaded.model, config),
            batch=batch,
            max_batch=config.max_batch if batch is not None else 1,
            batching=batching,
        )


def build_batch(model: object, speculative: SpeculativeDecoder | None, config: EngineConfig, lockstep: bool
                ) -> tuple[BatchDecoder | None, str]:
    """The batched decoder for --max-batch N > 1, and what /health says about it."""
    if config.max_batch < 2:
        return None, "off (--max-batch 1)"
    reason = "not under tensor parallel yet" if lockstep else BatchDecoder.unsupported(model)
    if reason is not None:
        log.warning("requests run one at a time: %s", reason)
        return None, f"off ({reason})"
    target = None if speculative is None else speculative.target  # taps: a lone row goes back to the drafter
    return BatchDecoder(model, target=target, prefill_chunk=config.prefill_chunk), f"up to {config.max_batch} requests"


def build_prefix_cache(model: object, config: EngineConfig) -> PrefixCache | None:
    from mlx_lm.models.cache import make_prompt_cache

    from engine.decode.cache_snapshot import has_recurrent_layers, supports
    from engine.decode.prefix_cache import default_max_bytes

    max_bytes = default_max_bytes() if config.prefix_cache_bytes is None else config.prefix_cache_bytes
    if not config.prefix_cache or max_bytes == 0:
        return None
    cache = make_prompt_cache(model)
    if not supports(cache):
        kinds = sorted({type(c).__name__ for c in cache})
        log.warning("no prefix cache: this target's caches (%s) cannot be cut at a prefix", ", ".join(kinds))
        return None
    log.info("prefix cache: up to %.2f GiB", max_bytes / (1 << 30))
    return PrefixCache(max_bytes, needs_boundaries=has_recurrent_layers(cache))


def gpu_kernels_on() -> bool:
    """Whether a GPU kernel is on whose compile or runtime choice warm_up keeps out of the first request."""
    from engine.backend.verify_gemm import default_verify_gemm
    from engine.backend.verify_matmul import default_verify_matmul

    kernels = (default_attention_kernel(), default_verify_matmul(), default_verify_gemm())
    return any(k.kernel is not None for k in kernels)


def warm_up(decoder: SpeculativeDecoder, costs: CostCache | None = None, key: str = "", rehearse: bool = False) -> None:
    """A few greedy tokens at load, here rather than inside the first request's TTFT: the verify costs
    are measured or read from `costs` (timing every row count takes ~8 s for the 135M on 2 CPU cores),
    and on CUDA the block-attention kernel is compiled (NVRTC) and checked and the verify matmuls
    decided for what the drafter feeds the shared LM head (the draft's dtype). `rehearse` (GPUs): then
    every chain width and tree budget once per sampling mode, whose first cycles compile kernels."""
    from engine.decode.sampling import SamplingParams, TokenRng
    from engine.decode.speculative import WARM_PROMPT

    start = time.perf_counter()
    cached = None if costs is None or not decoder.adaptive else costs.get(key)
    if cached is not None:
        decoder.cost_curve, decoder.draft_row_s, decoder.plain_step_s = cached.curve, cached.draft_row_s, cached.plain_step_s
        decoder.curve_from_cache = True
    for _ in decoder.generate(list(WARM_PROMPT), SamplingParams(temperature=0.0), 4, TokenRng(0)):
        pass
    rehearsed = 0
    if rehearse:
        log.info("running each speculative cycle shape once (its kernels compile now, not in a request: "
                 "minutes on a GPU's first start, seconds once MLX has them cached)")
        rehearsed = decoder.rehearse()
    decoder.forget_acceptance()  # what the dummy prompt's drafts taught is not the drafter's rate
    read = cached is not None and decoder.cost_curve is cached.curve  # else measured (again, if it disagreed)
    if costs is not None and not read and decoder.cost_curve is not None and decoder.draft_row_s is not None:
        costs.put(key, Costs(decoder.cost_curve, decoder.draft_row_s, decoder.plain_step_s))
    how = "none measured" if not decoder.adaptive else "costs read from" if read else "costs measured"
    where = f" {costs.path}" if costs is not None and decoder.adaptive else ""
    shapes = f", {rehearsed} rehearsal cycles" if rehearse else ""
    log.info("speculative decoder warmed up in %.1f s (verify %s%s%s)", time.perf_counter() - start, how, where, shapes)


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()


def warm_prefill(decoders: list[PlainDecoder | SpeculativeDecoder], prefill_chunk: int) -> None:
    """One request a decoder over a prompt longer than a prefill chunk, at load: on CUDA a process's
    first prefill compiles its kernels (NVRTC), which took 18.6 s of the first request's TTFT for the
    135M on an H200, and no warm-up of a few tokens reaches that path."""
    from engine.decode.sampling import SamplingParams, TokenRng

    start = time.perf_counter()
    prompt = [100 + i % 400 for i in range(prefill_chunk + 64)]  # ids every vocabulary has
    for decoder in decoders:
        for _ in decoder.generate(prompt, SamplingParams(temperature=0.0), 8, TokenRng(0)):
            pass
        if (forget := getattr(decoder, "forget_acceptance", None)) is not None:
            forget()  # a made-up prompt's drafts are not the drafter's rate
    log.info("prefill kernels warmed up in %.1f s", time.perf_counter() - start)


def warm_batch(batch: BatchDecoder) -> None:
    """Two requests of different lengths through a few batched steps at load, then gone: on CUDA a batched
    step's attention kernel (the padded variant) is compiled and checked at its first use, which would
    otherwise stall the first requests that arrive together."""
    from engine.decode.batch import BatchStats
    from engine.decode.prefix_cache import PrefixLease
    from engine.decode.sampling import SamplingParams, TokenRng

    start = time.perf_counter()
    rows = []
    for prompt in ([3 + i for i in range(8)], [5 + i for i in range(13)]):  # ids every vocabulary has
        row = batch.make_row(SamplingParams(temperature=0.0), TokenRng(0), PrefixLease(None, prompt, None), len(prompt),
                             wants_taps=True)
        batch.prefill_and_join(row, prompt)
        rows.append(row)
    for _ in range(3):
        batch.step()
    for row in rows:
        batch.leave(row)
    batch.stats = BatchStats()  # the made-up requests are not the server's
    log.info("batched steps warmed up in %.1f s", time.perf_counter() - start)


def cost_key(loaded: object, config: EngineConfig, drafter: str) -> str:
    """What measured verify costs hold for: this machine and backend, the model files, the settings."""
    from engine.backend.blas import loaded_blas, machine_key
    from engine.model.compiled_layer import enabled_by_env
    from engine.runtime.cost_cache import engine_stamp

    blas = loaded_blas()  # not blas_status(): its words change once the BLAS choice is cached
    draft = resolve_draft(config.draft, config.model, loaded.model_id) if config.drafter == "dflash" else None
    paths = [loaded.path, *([] if draft is None else [Path(draft).expanduser()])]
    stamps = [f"{p}:{_stamp(p)}" for p in paths if p.exists()]
    kernels = []
    if uses_quant_kernel(loaded.model):  # a rebuilt kernel (new source or MLX) prices its cycles anew
        from engine.backend.cpu_quant import build_key

        kernels = [f"cpu_quant {build_key()}"]
    return " | ".join([machine_key([] if blas is None else [blas]), str(mx.default_device()), loaded.model_id, loaded.description, drafter, *stamps,
                       f"block {config.block_size} dequantize {config.dequantize} fuse {config.fuse_projections}",
                       f"engine {engine_stamp()} compiled layers {enabled_by_env()}", *kernels])


def _stamp(path: Path) -> str:
    """Size and modification time of a file, or of a directory's files: a changed model is measured again."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return ",".join(f"{p.stat().st_size}@{int(p.stat().st_mtime)}" for p in files[:64])


def load_target(config: EngineConfig, group: mx.distributed.Group | None = None) -> tuple[LoadedModel, str]:
    """The target loaded and prepared as served (the quantized CPU kernel's layers kept where it runs), and
    what preparing did."""
    from engine.model.loader import load_model

    dequantize = {"auto": None, "yes": True, "no": False}[config.dequantize]
    kernel: list[CpuQuant] = []  # decided once the model is found and has layers the kernel can run

    def kernel_runs() -> bool:
        kernel.extend(filter(None, [cpu_quant_kernel(config, lockstep=group is not None and group.size() > 1)]))
        return bool(kernel)

    loaded = load_model(config.model, dequantize=dequantize, group=group, quant_kernel=kernel_runs)
    return loaded, prepare_model(loaded.model, fuse=config.fuse_projections, cpu_quant=kernel[0] if kernel else None)


def uses_quant_kernel(model: object) -> bool:
    from engine.model.quant_linear import QuantEmbedding, QuantLinear

    return any(isinstance(m, QuantLinear | QuantEmbedding) for _, m in model.named_modules())


def cpu_quant_kernel(config: EngineConfig, lockstep: bool = False) -> CpuQuant | None:
    """The quantized CPU kernel for the model's 4- and 8-bit layers where it runs (MLX on the CPU,
    --dequantize auto, not tensor parallel; built, checked and faster here); None: float32 weights
    (--dequantize yes, or auto without the kernel) or MLX's quantized layers as loaded (no). Logs which."""
    if mx.default_device() != mx.cpu or config.dequantize != "auto" or lockstep:
        return None
    from engine.backend.cpu_quant import default_cpu_quant

    kernel = default_cpu_quant()
    log.info("quantized CPU kernel: %s%s", "on, " if kernel.ext is not None else "off: ", kernel.reason)
    return kernel if kernel.ext is not None else None


def prepare_model(model: object, *, fuse: bool, cpu_quant: CpuQuant | None = None) -> str:
    """Packed Q/K/V and gate/up projections, then verify-width kernels on a GPU or transposed float
    weights (or the 4-bit kernel's layers), table RoPE and compiled norms on the CPU; says what was done."""
    from engine.backend.verify_kernels import apply as use_verify_kernels
    from engine.backend.verify_matmul import default_verify_matmul
    from engine.model.compiled_layer import compile_layers, enabled_by_env
    from engine.model.compiled_norm import compile_norms
    from engine.model.fused import fuse_projections
    from engine.model.rope_table import use_table_rope
    from engine.model.scale_dtype import widen_scales
    from engine.model.transposed import transpose_linears

    notes = [f"packed projections in {fuse_projections(model)} layers" if fuse else "unfused projections"]
    if on_cuda() and (widened := widen_scales(model)):  # before the verify kernels decide on the layers
        notes.append(f"float32 scales in {widened} quantized layers")
    if cpu_quant is not None:  # after fusing: the packed layers are the ones repacked
        from engine.backend import fast_exp
        from engine.model import attention, compiled_norm
        from engine.model.quant_linear import use_quant_kernel

        notes.append(f"{use_quant_kernel(model, cpu_quant)} quantized layers, block attention, SwiGLU and RMSNorm "
                     "on the CPU kernel")
        for module in (attention, fast_exp, compiled_norm):  # the ops of every model in this process
            module.use_cpu_kernel(cpu_quant.ext)
    if mx.default_device() == mx.cpu:  # after fusing: the packed layers are the ones transposed
        notes.append(f"{transpose_linears(model)} float32 matrices stored transposed")
        notes.append(f"{use_table_rope(model)} RoPE modules read a cos/sin table")
        notes.append(f"{compile_norms(model)} RMSNorms compiled")
    if default_verify_matmul().kernel is not None:  # a GPU backend; the CPU keeps MLX's own matmul
        # after fusing, so the packed layers are the ones swapped
        notes.append(f"verify kernels considered for {use_verify_kernels(model)} layers")
    if enabled_by_env():  # last: a layer's graphs capture the modules and routes chosen above
        notes.append(f"{compile_layers(model)} decoder layers compiled")
    return ", ".join(notes)


def prepare_draft(draft: object, model: object) -> str:
    """What the draft needs beside a prepared target: float32 weights for float32 activations on CUDA
    (engine/model/scale_dtype.py), or its linear layers in 8 bits on the quantized CPU kernel where the
    target runs on it; says what was done."""
    from engine.model.quant_linear import quantize_onto_kernel
    from engine.model.scale_dtype import widen_draft

    if on_cuda() and (widened := widen_draft(draft, model)):
        return f"draft weights widened to float32 ({widened} arrays)"
    if (quantized := quantize_onto_kernel(draft, model)):
        return f"{quantized} draft layers in 8 bits on the quantized CPU kernel"
    return ""


def resolve_draft(spec: str, target: str, model_id: str) -> str | None:
    if spec == "none":
        return None
    if spec == "default":
        draft = default_draft_for(target, model_id)
        if draft is None or (Path(draft).is_absolute() and not (Path(draft) / "config.json").is_file()):
            log.warning("no DFlash draft is known for %s: decoding without one", model_id)
            return None
        return draft
    return spec


def build_speculative(
    loaded: object, config: EngineConfig, *, adaptive: bool = True, learn_overheads: bool = True
) -> tuple[SpeculativeDecoder | None, str]:
    from engine.decode.drafters import DFlashDrafter, NgramDrafter
    from engine.decode.speculative import SpeculativeDecoder
    from engine.model.target import Target

    if config.drafter == "ngram":
        if config.draft not in ("default", "none"):
            raise ValueError("--drafter ngram takes no draft model; drop --draft")
        target = Target(loaded.model, layer_ids=())
        drafter = NgramDrafter()
        block_size = config.block_size or NGRAM_BLOCK_SIZE
        decoder = SpeculativeDecoder(target, drafter, block_size=block_size, prefill_chunk=config.prefill_chunk,
                                     adaptive=adaptive, tree_budget=_tree_budget(config, adaptive),
                                     learn_overheads=learn_overheads)
        return decoder, "ngram" + _tree_note(decoder)
    path = resolve_draft(config.draft, config.model, loaded.model_id)
    if path is None:
        return None, "none"
    from engine.decode.proposal_head import FILE as PROPOSAL_FILE
    from engine.decode.proposal_head import load_proposal_head
    from engine.model.draft import load_draft
    from engine.model.loader import resolve_local_path

    local = resolve_local_path(path)
    draft = load_draft_for(path, loaded, load_draft, local=local)
    if note := prepare_draft(draft, loaded.model):
        log.info("draft: %s", note)
    target = Target(loaded.model, layer_ids=draft.config.target_layer_ids)
    block_size = config.block_size or draft.config.block_size
    head = load_proposal_head(local, target.output_head, output_multiplier=draft.config.output_multiplier)
    if head is not None:
        log.info("draft: greedy proposals from the %d most frequent answer tokens (%s)", head.ids.size, PROPOSAL_FILE)
    decoder = SpeculativeDecoder(target, DFlashDrafter(draft, target, head), block_size=block_size,
                                 prefill_chunk=config.prefill_chunk, adaptive=adaptive,
                                 tree_budget=_tree_budget(config, adaptive), learn_overheads=learn_overheads)
    kind = "dflash2" if draft.config.is_dflash2 else "dflash"  # DFlash 2: conv + selector (docs/architecture.md)
    return decoder, f"{kind} ({path})" + _tree_note(decoder)


def _tree_budget(config: EngineConfig, adaptive: bool) -> int | str:
    """--tree-budget, except that 'auto' is the adaptive controller's: fixed widths verify chains."""
    return 0 if config.tree_budget == "auto" and not adaptive else config.tree_budget


def _tree_note(decoder: SpeculativeDecoder) -> str:
    """What /health's drafter adds about tree verification: nothing when it is off by request."""
    return "" if decoder.tree_status == "off" else f", trees {decoder.tree_status}"


def load_draft_for(path: str, loaded: object, load_draft: object, local: Path | None = None) -> object:
    """`local`: the path already resolved from `path` (an HF repo id is resolved once)."""
    from engine.model.loader import resolve_local_path

    local = local if local is not None else resolve_local_path(path)
    args = vars(loaded.model.args)
    args = {**args, **(args.get("text_config") or {})}  # multimodal families (qwen3_5) nest the LM's dims
    try:
        return load_draft(
            local,
            target_hidden_size=args["hidden_size"],
            target_vocab_size=args["vocab_size"],
            target_num_layers=args["num_hidden_layers"],
        )
    except ValueError as e:  # name the draft: the message alone may read as the target's fault
        raise ValueError(f"draft {path}: {e}; pass another --draft, or --no-draft") from e


def describe_backend() -> str:
    device = mx.default_device()
    if device == mx.cpu:
        from engine.backend.blas import blas_status

        return f"MLX {mx.__version__} CPU, {blas_status()}"
    if mx.metal.is_available():
        return f"MLX {mx.__version__} Metal"
    return f"MLX {mx.__version__} {device}"
