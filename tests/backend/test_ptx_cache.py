"""The CUDA kernel cache's folder (engine/backend/ptx_cache.py)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from engine.backend.ptx_cache import ENV, keep_compiled_kernels, ptx_cache_dir


def test_one_folder_per_gpu_and_mlx_version_under_the_cache_home(tmp_path: Path) -> None:
    environ = {"XDG_CACHE_HOME": str(tmp_path)}
    h100 = ptx_cache_dir("NVIDIA H100 80GB HBM3", "0.32.4", environ)
    assert h100 == tmp_path / "dflash-server" / "ptx" / "mlx-0.32.4-NVIDIA-H100-80GB-HBM3"
    assert ptx_cache_dir("NVIDIA H200", "0.32.4", environ) != h100 != ptx_cache_dir("NVIDIA H100 80GB HBM3", "0.33.0", environ)
    assert ptx_cache_dir("", "0.32.4", environ).name == "mlx-0.32.4-gpu"


def test_a_folder_the_user_chose_is_kept_and_other_backends_are_left_alone(tmp_path: Path) -> None:
    chosen = {ENV: str(tmp_path / "mine")}
    assert keep_compiled_kernels(chosen) is None and chosen == {ENV: str(tmp_path / "mine")}
    environ: dict[str, str] = {"XDG_CACHE_HOME": str(tmp_path)}
    on_cuda = mx.default_device() == mx.gpu and hasattr(mx, "cuda") and mx.cuda.is_available()
    got = keep_compiled_kernels(environ)
    assert (got is not None) == on_cuda and (ENV in environ) == on_cuda
