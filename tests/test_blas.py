"""OpenBLAS preload: the re-exec decision, and a real re-exec in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.blas import OPT_OUT_ENV, REEXEC_MARKER_ENV, find_openblas, openblas_reexec_env

LIB = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
ROOT = Path(__file__).resolve().parents[1]
CHILD = (
    "from engine.blas import maybe_reexec_with_openblas, blas_status\n"
    "maybe_reexec_with_openblas()\n"
    "print(blas_status())\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
def test_reexec_env_decision() -> None:
    env = openblas_reexec_env({"PATH": "/bin"}, LIB, on_cpu=True)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(LIB), REEXEC_MARKER_ENV: "1"}
    assert openblas_reexec_env({"LD_PRELOAD": "/x.so"}, LIB, on_cpu=True)["LD_PRELOAD"] == f"{LIB}:/x.so"
    assert openblas_reexec_env({}, LIB, on_cpu=False) is None
    assert openblas_reexec_env({}, None, on_cpu=True) is None
    assert openblas_reexec_env({OPT_OUT_ENV: "1"}, LIB, on_cpu=True) is None
    assert openblas_reexec_env({REEXEC_MARKER_ENV: "1"}, LIB, on_cpu=True) is None  # never loops
    assert openblas_reexec_env({"LD_PRELOAD": str(LIB)}, LIB, on_cpu=True) is None


def run_child(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT_ENV, REEXEC_MARKER_ENV)}
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
def test_reexec_preloads_openblas() -> None:
    assert run_child().startswith("OpenBLAS (preloaded")
    assert run_child(**{OPT_OUT_ENV: "1"}).startswith("reference BLAS")
