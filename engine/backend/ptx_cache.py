"""Where MLX's CUDA backend keeps the kernels it compiles (NVRTC): a folder that outlives reboots.

MLX writes them under the system temp dir (/tmp/mlx/<version>/ptx) unless MLX_PTX_CACHE_DIR names another;
a reboot or a fresh container then compiles them all again, which on an H100 took a fresh start's warm-up
of the 135M with trees ~3 minutes, and a start that found them ~1 s. One folder per GPU name and MLX
version: kernels compiled for one architecture must not be loaded on another.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

from engine.backend.disk_cache import cache_home

ENV = "MLX_PTX_CACHE_DIR"


def ptx_cache_dir(device_name: str, mlx_version: str, environ: MutableMapping[str, str] = os.environ) -> Path:
    """~/.cache/dflash-server/ptx/mlx-<version>-<device> (XDG_CACHE_HOME respected)."""
    device = re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-") or "gpu"
    return cache_home(environ) / "ptx" / f"mlx-{mlx_version}-{device}"


def keep_compiled_kernels(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """On CUDA, point MLX's kernel cache at ptx_cache_dir unless the user chose one; before the first compile.
    Returns the folder set, or None (another backend, or MLX_PTX_CACHE_DIR already set)."""
    if environ.get(ENV):
        return None
    import mlx.core as mx

    if mx.default_device() != mx.gpu or not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return None
    path = ptx_cache_dir(str(mx.device_info().get("device_name", "gpu")), mx.__version__, environ)
    environ[ENV] = str(path)
    return path
