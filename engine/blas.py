"""OpenBLAS for MLX's Linux CPU backend: find it, preload it by re-exec, and report what is active.

The mlx[cpu] wheel links a bundled reference BLAS (~4 GFLOP/s fp32 GEMM here). Preloading a
system OpenBLAS makes MLX's `cblas_sgemm` calls resolve to it (~115 GFLOP/s). A preload has to be
in place before the dynamic linker loads libmlx, hence the re-exec.

Usage, first thing in a CLI entry point (before importing anything heavy):

    from engine.blas import maybe_reexec_with_openblas
    maybe_reexec_with_openblas()        # may replace the process; returns if nothing to do

Set DFLASH_NO_OPENBLAS=1 to opt out.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

OPT_OUT_ENV = "DFLASH_NO_OPENBLAS"
# Set in the re-exec'd child so a failed preload can never loop.
REEXEC_MARKER_ENV = "DFLASH_OPENBLAS_REEXEC"

log = logging.getLogger(__name__)


def find_openblas() -> Path | None:
    """The first OpenBLAS shared library found in the usual Debian/Ubuntu/Fedora/Arch places."""
    triplet = f"{platform.machine()}-linux-gnu"
    candidates = [
        f"/usr/lib/{triplet}/openblas-pthread/libblas.so.3",  # Debian: libopenblas0-pthread
        f"/usr/lib/{triplet}/openblas-openmp/libblas.so.3",   # Debian: libopenblas0-openmp
        f"/usr/lib/{triplet}/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


def openblas_reexec_env(environ: Mapping[str, str], library: Path | None, *, on_cpu: bool) -> dict[str, str] | None:
    """The environment to re-exec with, or None when no re-exec is wanted (pure; testable)."""
    if not sys.platform.startswith("linux") or not on_cpu or library is None:
        return None
    if environ.get(OPT_OUT_ENV) or environ.get(REEXEC_MARKER_ENV):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else str(library)
    env[REEXEC_MARKER_ENV] = "1"
    return env


def maybe_reexec_with_openblas(argv: list[str] | None = None) -> None:
    """Re-exec this process with OpenBLAS in LD_PRELOAD when MLX would run on the Linux CPU.

    `argv` is what follows the interpreter, e.g. ["-m", "server", "--port", "8000"]; by default
    the original command line (`sys.orig_argv[1:]`), which restarts `python -m server` and
    console scripts alike. Returns normally when there is nothing to do or the exec fails.
    """
    if not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    env = openblas_reexec_env(os.environ, find_openblas(), on_cpu=on_cpu)
    if env is None:
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args], env)
    except OSError as e:
        log.warning("could not re-exec with OpenBLAS preloaded (%s); continuing with the bundled BLAS", e)


def loaded_openblas() -> str | None:
    """Path of an OpenBLAS mapped into this process that MLX can use, from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        # numpy's wheel bundles libscipy_openblas64_ with renamed symbols: MLX cannot use it.
        if "openblas" in path and "scipy_openblas" not in path and "site-packages" not in path:
            return path
    return None


def blas_status() -> str:
    """One line for the startup banner: which BLAS serves MLX's matmuls."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return f"{mx.default_device()} (BLAS not used for matmul)"
    library = loaded_openblas()
    if library is not None:
        how = "preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else "linked"
        return f"OpenBLAS ({how}: {library})"
    found = find_openblas()
    if found is None:
        hint = "install libopenblas0-pthread"
    elif os.environ.get(OPT_OUT_ENV):
        hint = f"{OPT_OUT_ENV} is set; unset it"
    else:
        hint = f"set LD_PRELOAD={found}"
    return f"reference BLAS ({hint} for ~25x faster CPU matmul)"
