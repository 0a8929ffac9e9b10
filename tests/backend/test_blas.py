"""BLAS preload: which library is chosen, the re-exec decision, and real re-execs in child processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.backend.blas import (
    CHOICE_ENV,
    MKL_LAYER_ENV,
    OPT_OUT_ENV,
    REEXEC_MARKER_ENV,
    Blas,
    blas_reexec_env,
    find_blas,
    find_mkl,
    find_openblas,
)

OPENBLAS = Blas("openblas", Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"))
MKL = Blas("mkl", Path("/venv/lib/libmkl_rt.so.2"))
ROOT = Path(__file__).resolve().parents[2]
CHILD = (
    "from engine.backend.blas import maybe_reexec_with_blas, blas_status\n"
    "maybe_reexec_with_blas()\n"
    "print(blas_status())\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
def test_reexec_env_decision() -> None:
    env = blas_reexec_env({"PATH": "/bin"}, OPENBLAS, on_cpu=True)
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(OPENBLAS.library), REEXEC_MARKER_ENV: "1"}
    assert blas_reexec_env({"LD_PRELOAD": "/x.so"}, OPENBLAS, on_cpu=True)["LD_PRELOAD"] == f"{OPENBLAS.library}:/x.so"
    assert blas_reexec_env({}, OPENBLAS, on_cpu=False) is None
    assert blas_reexec_env({}, None, on_cpu=True) is None
    assert blas_reexec_env({REEXEC_MARKER_ENV: "1"}, OPENBLAS, on_cpu=True) is None  # never loops
    assert blas_reexec_env({"LD_PRELOAD": str(OPENBLAS.library)}, MKL, on_cpu=True) is None  # the user's choice
    mkl = blas_reexec_env({}, MKL, on_cpu=True)
    assert mkl["LD_PRELOAD"] == str(MKL.library) and mkl[MKL_LAYER_ENV] == "GNU"  # libgomp, not libiomp5
    assert blas_reexec_env({MKL_LAYER_ENV: "SEQUENTIAL"}, MKL, on_cpu=True)[MKL_LAYER_ENV] == "SEQUENTIAL"


def test_choice_follows_the_environment() -> None:
    mkl, openblas = find_mkl(), find_openblas()
    assert find_blas({CHOICE_ENV: "none"}) is None and find_blas({OPT_OUT_ENV: "1"}) is None
    auto = find_blas({})
    assert auto == (Blas("mkl", mkl) if mkl else Blas("openblas", openblas) if openblas else None)
    assert find_blas({CHOICE_ENV: "openblas"}) == (Blas("openblas", openblas) if openblas else None)
    assert find_blas({CHOICE_ENV: "MKL"}) == (Blas("mkl", mkl) if mkl else None)
    with pytest.raises(ValueError, match=CHOICE_ENV):
        find_blas({CHOICE_ENV: "atlas"})


def run_child(**env: str) -> str:
    drop = ("LD_PRELOAD", OPT_OUT_ENV, REEXEC_MARKER_ENV, CHOICE_ENV, MKL_LAYER_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
def test_reexec_preloads_openblas() -> None:
    assert run_child(**{CHOICE_ENV: "openblas"}).startswith("OpenBLAS (preloaded")
    assert run_child(**{OPT_OUT_ENV: "1"}).startswith("reference BLAS")
    assert run_child(**{CHOICE_ENV: "none"}).startswith("reference BLAS")


@pytest.mark.skipif(find_mkl() is None, reason="no mkl wheel (x86-64 Linux) or no libgomp")
def test_reexec_preloads_mkl_by_default() -> None:
    assert run_child().startswith("MKL (preloaded") and "GNU threading" in run_child()
