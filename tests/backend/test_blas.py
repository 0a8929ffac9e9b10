"""BLAS preload: which library is chosen, the re-exec decision, and real re-execs in child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.backend.blas import (
    CACHE_ENV,
    CHOICE_ENV,
    MAX_CACHED_MACHINES,
    MKL_LAYER_ENV,
    OPT_OUT_ENV,
    REASON_ENV,
    REEXEC_MARKER_ENV,
    WAIT_POLICY_ENV,
    Blas,
    Choice,
    blas_reexec_env,
    find_blas,
    find_mkl,
    find_openblas,
    machine_key,
    measured_choice,
    time_blas,
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
    assert env == {"PATH": "/bin", "LD_PRELOAD": str(OPENBLAS.library), REEXEC_MARKER_ENV: "1",
                   WAIT_POLICY_ENV: "PASSIVE"}
    assert blas_reexec_env({"LD_PRELOAD": "/x.so"}, OPENBLAS, on_cpu=True)["LD_PRELOAD"] == f"{OPENBLAS.library}:/x.so"
    assert blas_reexec_env({}, OPENBLAS, on_cpu=False) is None
    assert blas_reexec_env({}, None, on_cpu=True) is None
    assert blas_reexec_env({REEXEC_MARKER_ENV: "1"}, OPENBLAS, on_cpu=True) is None  # never loops
    assert blas_reexec_env({"LD_PRELOAD": str(OPENBLAS.library)}, MKL, on_cpu=True) is None  # the user's choice
    mkl = blas_reexec_env({}, MKL, on_cpu=True)
    assert mkl["LD_PRELOAD"] == str(MKL.library) and mkl[MKL_LAYER_ENV] == "GNU"  # libgomp, not libiomp5
    assert blas_reexec_env({MKL_LAYER_ENV: "SEQUENTIAL"}, MKL, on_cpu=True)[MKL_LAYER_ENV] == "SEQUENTIAL"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")
@pytest.mark.parametrize("blas", [MKL, OPENBLAS], ids=lambda b: b.name)
def test_reexec_sleeps_at_openmp_barriers_unless_the_user_says_otherwise(blas: Blas) -> None:
    # spinning OpenMP threads stall each other when another process holds a core
    assert blas_reexec_env({}, blas, on_cpu=True)[WAIT_POLICY_ENV] == "PASSIVE"
    assert blas_reexec_env({WAIT_POLICY_ENV: "ACTIVE"}, blas, on_cpu=True)[WAIT_POLICY_ENV] == "ACTIVE"


def test_the_timing_child_runs_with_the_servers_threading(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    def fake_run(*args: object, env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess:
        seen.append(env)
        return subprocess.CompletedProcess(args, 0, stdout="12.5\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv(WAIT_POLICY_ENV, raising=False)
    monkeypatch.delenv(MKL_LAYER_ENV, raising=False)
    assert time_blas(MKL) == 12.5
    server = blas_reexec_env({}, MKL, on_cpu=True)
    threading = (WAIT_POLICY_ENV, MKL_LAYER_ENV)
    assert {k: seen[0][k] for k in threading} == {k: server[k] for k in threading} == {
        WAIT_POLICY_ENV: "PASSIVE", MKL_LAYER_ENV: "GNU"}
    monkeypatch.setenv(WAIT_POLICY_ENV, "ACTIVE")  # the user's value, timed as the server will run it
    time_blas(MKL)
    assert seen[1][WAIT_POLICY_ENV] == "ACTIVE"


def test_choice_follows_the_environment() -> None:
    mkl, openblas = find_mkl(), find_openblas()
    assert find_blas({CHOICE_ENV: "none"}) is None and find_blas({OPT_OUT_ENV: "1"}) is None
    slower_mkl = lambda found: Choice(next(b for b in found if b.name == "openblas"), "test")  # noqa: E731
    auto = find_blas({}, measure=slower_mkl)
    assert auto == (Blas("openblas", openblas) if openblas else Blas("mkl", mkl) if mkl else None)
    assert find_blas({CHOICE_ENV: "openblas"}) == (Blas("openblas", openblas) if openblas else None)
    assert find_blas({CHOICE_ENV: "MKL"}) == (Blas("mkl", mkl) if mkl else None)
    with pytest.raises(ValueError, match=CHOICE_ENV):
        find_blas({CHOICE_ENV: "atlas"})


def test_the_faster_blas_is_measured_once_per_machine_and_cached(tmp_path: Path) -> None:
    times = {"mkl": 30.0, "openblas": 20.0}
    calls: list[str] = []

    def timer(blas: Blas) -> float:
        calls.append(blas.name)
        return times[blas.name]

    cache = tmp_path / "blas.json"
    choice = measured_choice([MKL, OPENBLAS], timer=timer, path=cache)
    assert choice.blas == OPENBLAS and "mkl 30.0 ms, openblas 20.0 ms" in choice.reason and "measured now" in choice.reason
    assert calls == ["mkl", "openblas"] * 2  # alternated, so a passing load hits both
    times["openblas"] = 99.0  # cached: not measured again
    again = measured_choice([MKL, OPENBLAS], timer=timer, path=cache)
    assert again.blas == OPENBLAS and len(calls) == 4 and f"cached in {cache}" in again.reason
    other = Blas("openblas", tmp_path / "another-libblas.so")  # another library: a new measurement
    assert measured_choice([MKL, other], timer=timer, path=cache).blas == MKL and len(calls) == 8


def test_the_cache_keeps_the_newest_machines_only(tmp_path: Path) -> None:
    """Each fresh virtual environment (CI makes one per run) is a new key: the file must not grow forever."""
    cache = tmp_path / "blas.json"
    for i in range(MAX_CACHED_MACHINES + 3):
        measured_choice([MKL, Blas("openblas", tmp_path / f"venv{i}" / "libblas.so")], timer=lambda b: 10.0, path=cache)
    entries = json.loads(cache.read_text())
    assert len(entries) == MAX_CACHED_MACHINES and any(f"venv{MAX_CACHED_MACHINES + 2}" in key for key in entries)
    assert not any("venv0/" in key for key in entries)


def test_a_measurement_is_cached_per_openmp_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_POLICY_ENV, raising=False)
    default = machine_key([MKL, OPENBLAS])
    monkeypatch.setenv(WAIT_POLICY_ENV, "ACTIVE")  # spinning MKL may win where sleeping MKL loses
    assert machine_key([MKL, OPENBLAS]) != default
    monkeypatch.setenv(WAIT_POLICY_ENV, "PASSIVE")
    assert machine_key([MKL, OPENBLAS]) == default


def test_a_failed_timing_loses(tmp_path: Path) -> None:
    timer = lambda blas: float("inf") if blas.name == "mkl" else 50.0  # noqa: E731
    assert measured_choice([MKL, OPENBLAS], timer=timer, path=tmp_path / "c.json").blas == OPENBLAS


@pytest.mark.skipif(find_openblas() is None, reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
def test_timing_a_real_blas_in_a_child_process() -> None:
    assert 0 < time_blas(Blas("openblas", find_openblas())) < 1e4


def run_child(**env: str) -> str:
    drop = ("LD_PRELOAD", OPT_OUT_ENV, REEXEC_MARKER_ENV, CHOICE_ENV, MKL_LAYER_ENV, REASON_ENV, WAIT_POLICY_ENV)
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
def test_reexec_preloads_mkl_when_asked() -> None:
    status = run_child(**{CHOICE_ENV: "mkl"})
    assert status.startswith("MKL (preloaded") and f"GNU threading, {WAIT_POLICY_ENV}=PASSIVE" in status
    assert f"{WAIT_POLICY_ENV}=ACTIVE" in run_child(**{CHOICE_ENV: "mkl", WAIT_POLICY_ENV: "ACTIVE"})


@pytest.mark.skipif(find_mkl() is None or find_openblas() is None, reason="needs both MKL and OpenBLAS")
def test_reexec_preloads_the_faster_and_says_why(tmp_path: Path) -> None:
    found = [Blas("mkl", find_mkl()), Blas("openblas", find_openblas())]
    for faster, label in (("mkl", "MKL (preloaded"), ("openblas", "OpenBLAS (preloaded")):
        cache = tmp_path / f"{faster}.json"
        cache.write_text(json.dumps({machine_key(found): {b.name: 1.0 if b.name == faster else 2.0 for b in found}}))
        status = run_child(**{CACHE_ENV: str(cache)})
        assert status.startswith(label) and "the faster on this machine" in status and str(cache) in status
