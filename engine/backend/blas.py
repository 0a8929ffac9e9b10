"""A fast BLAS for MLX's Linux CPU backend: find one, preload it by re-exec, and report what is active.

The mlx[cpu] wheel links a bundled reference BLAS (~4 GFLOP/s fp32 GEMM here). Preloading another
makes MLX's `cblas_sgemm` calls resolve to it. A preload has to be in place before the dynamic
linker loads libmlx, hence the re-exec. Two are known:
- Intel MKL from the `mkl` wheel (a dependency on x86-64 Linux), with its GNU OpenMP threading layer;
- OpenBLAS (Debian's libopenblas0-pthread).
Which is faster depends on the CPU: on a 2-core Xeon (Sapphire Rapids) MKL decoded the embedded model
at 22.5 tok/s against OpenBLAS's 17.5, on a 2-core AMD EPYC at 16.4 against 19.2. So where both are
present the first start times both on a random model of the embedded model's shape (a decode step, a
batched step, a verify; MEASURE_CODE), in child processes, and keeps the faster; the result is cached per
machine (CPU model, core count, libraries, MLX version).

Usage, first thing in a CLI entry point (before importing anything heavy):

    from engine.backend.blas import maybe_reexec_with_blas
    maybe_reexec_with_blas()        # may replace the process; returns if nothing to do

DFLASH_BLAS=auto|mkl|openblas|none chooses (auto: the faster of those found, by measurement);
DFLASH_NO_OPENBLAS=1 is the older spelling of none. The re-exec also sets OMP_WAIT_POLICY=PASSIVE
unless the user set it: spinning OpenMP threads stall beside other busy processes
(docs/benchmarks.md, bench/blas_threads.py).
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from engine.backend.disk_cache import DiskCache, cache_home

CHOICE_ENV = "DFLASH_BLAS"
CHOICES = ("auto", "mkl", "openblas", "none")
OPT_OUT_ENV = "DFLASH_NO_OPENBLAS"
# Set in the re-exec'd child so a failed preload can never loop.
REEXEC_MARKER_ENV = "DFLASH_OPENBLAS_REEXEC"
# libmkl_rt's default layer needs Intel's libiomp5; GNU's libgomp ships with most Linux systems
MKL_LAYER_ENV = "MKL_THREADING_LAYER"
# Spinning OpenMP threads stall when another process holds a core (2 cores, 2 busy loops: MKL decoded
# 0.3-6 tok/s spinning, 8-10 sleeping; idle it costs 31 -> 21 tok/s; docs/benchmarks.md)
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
WAIT_POLICY = "PASSIVE"
MEASURE_ROUNDS = 2
MAX_CACHED_MACHINES = 16  # a fresh virtual environment per CI run is a new key (library paths) each time
REASON_ENV = "DFLASH_BLAS_REASON"  # why the re-exec'd process has its BLAS (for the startup banner)
CACHE_ENV = "DFLASH_BLAS_CACHE"  # the per-machine measurement cache (default: ~/.cache/dflash-server/blas.json)
# What a measurement times: a random model of the embedded SmolLM2-135M's shape, prepared as the server
# prepares it, at 1 row (a decode step), a 4-row batched step (four requests) and a 16-row verify over a
# 300-token context; score = 1 row + batch / 4 + verify / 3, a token's share of each. Products alone did not
# rank the libraries as the model does: on a 2-core AMD EPYC MKL won those (16.7 against 27.3 ms) while
# the model's 4-row batched step took 127 ms with MKL against OpenBLAS's 60 and its verify 135 against
# 101 (decode 49 against 59), and the server decoded 20.2 tok/s with MKL, 26.6 with OpenBLAS (bench.py).
# ~8 s a library. Printed as milliseconds by a child process with the BLAS preloaded.
MEASURE_VERSION = 2  # in the cache key: a new measurement is not compared with an old one
MEASURE_CODE = """
import time, mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.llama import Model, ModelArgs
from engine.decode.batch import BatchDecoder
from engine.decode.prefix_cache import PrefixLease
from engine.decode.sampling import SamplingParams, TokenRng
from engine.runtime.serving_model import prepare_model
model = Model(ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152,
                        head_dim=64, tie_word_embeddings=True, rope_theta=100000.0))
model.set_dtype(mx.float32)
mx.eval(model.parameters())
prepare_model(model, fuse=True)
ids = [(7 * i) % 40000 + 100 for i in range(300)]
cache = make_prompt_cache(model)
mx.eval(model(mx.array([ids]), cache=cache))
batch = BatchDecoder(model)
for i in range(4):
    row = batch.make_row(SamplingParams(temperature=0.0), TokenRng(0), PrefixLease(None, ids[i:], None), 300 - i,
                         wants_taps=False)
    batch.prefill_and_join(row, ids[i:])
def forward(rows):
    mx.eval(model(mx.full((1, rows), 5, dtype=mx.int32), cache=cache))
    for c in cache:
        c.trim(rows)
def ms(step):
    step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3
print(ms(lambda: forward(1)) + ms(batch.step) / 4 + ms(lambda: forward(16)) / 3)
"""

log = logging.getLogger(__name__)


class Blas(NamedTuple):
    name: str  # "mkl" or "openblas"
    library: Path


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


def find_mkl() -> Path | None:
    """libmkl_rt from the `mkl` wheel (x86-64 Linux), when libgomp is there for its threading layer."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return None
    if ctypes.util.find_library("gomp") is None:
        return None
    candidates = [Path(sys.prefix) / "lib" / "libmkl_rt.so.2"]
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(f.locate())) for f in files if f.name == "libmkl_rt.so.2"]
    return next((c.resolve() for c in candidates if c.is_file()), None)


class Choice(NamedTuple):
    blas: Blas | None
    reason: str


def find_blas(environ: Mapping[str, str] = os.environ, *,
              measure: Callable[[list[Blas]], Choice] | None = None) -> Blas | None:
    """The BLAS to preload as DFLASH_BLAS asks; None for none found or wanted."""
    return choose_blas(environ, measure=measure).blas


def choose_blas(environ: Mapping[str, str] = os.environ, *,
                measure: Callable[[list[Blas]], Choice] | None = None) -> Choice:
    """The BLAS to preload and why: DFLASH_BLAS's choice, the only one found, or the faster by measurement."""
    choice = environ.get(CHOICE_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{CHOICE_ENV} must be one of {CHOICES}, got {choice!r}")
    if choice == "none" or environ.get(OPT_OUT_ENV):
        return Choice(None, f"{CHOICE_ENV}=none")
    found = [b for b in (mkl_blas(), openblas_blas()) if b is not None and choice in ("auto", b.name)]
    if not found:
        return Choice(None, "none found")
    if choice != "auto":
        return Choice(found[0], f"{CHOICE_ENV}={choice}")
    if len(found) == 1:
        return Choice(found[0], "the only one found")
    return (measure or measured_choice)(found)


def mkl_blas() -> Blas | None:
    return None if (path := find_mkl()) is None else Blas("mkl", path)


def openblas_blas() -> Blas | None:
    return None if (path := find_openblas()) is None else Blas("openblas", path)


def time_blas(blas: Blas) -> float:
    """MEASURE_CODE's score in a child process with `blas` preloaded (inf if it fails)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", CHOICE_ENV, OPT_OUT_ENV)}
    env.update({"LD_PRELOAD": str(blas.library), REEXEC_MARKER_ENV: "1"})
    for name, value in thread_env(blas).items():  # timed as the server will run it
        env.setdefault(name, value)
    try:
        done = subprocess.run([sys.executable, "-c", MEASURE_CODE], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        log.warning("timing %s failed: %s", blas.name, e)
        return float("inf")


def thread_env(blas: Blas) -> dict[str, str]:
    """The threading variables a preloaded `blas` runs with where the user has not set them."""
    layer = {MKL_LAYER_ENV: "GNU"} if blas.name == "mkl" else {}
    return {**layer, WAIT_POLICY_ENV: WAIT_POLICY}  # also read by an OpenMP build of OpenBLAS


def machine_key(candidates: list[Blas]) -> str:
    """What a cached measurement is valid for: this CPU, these libraries, this MLX, this OpenMP wait policy."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    libraries = ",".join(f"{b.library}:{_size(b.library)}" for b in candidates)
    try:
        mlx_version = importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        mlx_version = "?"
    waits = os.environ.get(WAIT_POLICY_ENV) or WAIT_POLICY  # spinning MKL times faster on an idle machine
    return (f"{model} x{os.cpu_count()} | {libraries} | mlx {mlx_version} | {WAIT_POLICY_ENV}={waits}"
            f" | measure {MEASURE_VERSION}")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def cache_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    return cache_home(environ) / "blas.json"


def measured_choice(candidates: list[Blas], *, timer: Callable[[Blas], float] = time_blas,
                    path: Path | None = None) -> Choice:
    """The faster of `candidates`, timed once per machine and cached."""
    path = path or cache_path()
    cache = DiskCache(path, MAX_CACHED_MACHINES)
    key = machine_key(candidates)
    entry = cache.get(key)
    how = f"cached in {path}"
    if entry is None or any(not isinstance(entry.get(b.name), int | float) for b in candidates):
        log.warning("timing %s once on this machine to pick the faster BLAS (cached in %s)",
                    " and ".join(b.name for b in candidates), path)
        entry = {b.name: float("inf") for b in candidates}
        for _ in range(MEASURE_ROUNDS):  # alternated, best of each: a load that comes and goes hits both
            entry = {b.name: min(entry[b.name], timer(b)) for b in candidates}
        stored = cache.put(key, entry, "the BLAS measurement")
        how = f"measured now, {'cached in' if stored else 'not cached in'} {path}"
    best = min(candidates, key=lambda b: entry[b.name])
    times = ", ".join(f"{b.name} {entry[b.name]:.1f} ms" for b in candidates)
    return Choice(best, f"the faster on this machine ({times} for a decode step, a 4-row batched step and a 16-row "
                        f"verify of a 135M model; {how})")


def blas_reexec_env(environ: Mapping[str, str], blas: Blas | None, *, on_cpu: bool,
                    reason: str | None = None) -> dict[str, str] | None:
    """The environment to re-exec with, or None when no re-exec is wanted (pure; testable)."""
    if not sys.platform.startswith("linux") or not on_cpu or blas is None:
        return None
    if environ.get(REEXEC_MARKER_ENV):
        return None
    if preloads_blas(environ):
        return None  # the user preloads a BLAS already
    preload = environ.get("LD_PRELOAD", "")
    env = dict(environ)
    env["LD_PRELOAD"] = f"{blas.library}:{preload}" if preload else str(blas.library)
    for name, value in thread_env(blas).items():
        env.setdefault(name, value)
    env[REEXEC_MARKER_ENV] = "1"
    if reason:
        env[REASON_ENV] = reason
    return env


def preloads_blas(environ: Mapping[str, str]) -> bool:
    return any(name in environ.get("LD_PRELOAD", "") for name in ("openblas", "libmkl_rt"))


def maybe_reexec_with_blas(argv: list[str] | None = None) -> None:
    """Re-exec this process with a fast BLAS in LD_PRELOAD when MLX would run on the Linux CPU.

    `argv` is what follows the interpreter, e.g. ["-m", "server", "--port", "8000"]; by default
    the original command line (`sys.orig_argv[1:]`), which restarts `python -m server` and
    console scripts alike. Returns normally when there is nothing to do or the exec fails.
    """
    if not sys.platform.startswith("linux"):
        return
    import mlx.core as mx

    on_cpu = mx.default_device() == mx.cpu
    if not on_cpu or os.environ.get(REEXEC_MARKER_ENV) or preloads_blas(os.environ):
        return  # before choose_blas: nothing to time when nothing will be preloaded
    choice = choose_blas()
    env = blas_reexec_env(os.environ, choice.blas, on_cpu=on_cpu, reason=choice.reason)
    if env is None:
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args], env)
    except OSError as e:
        log.warning("could not re-exec with %s preloaded (%s); continuing with the bundled BLAS", env["LD_PRELOAD"], e)


def loaded_blas() -> Blas | None:
    """The MKL or OpenBLAS mapped into this process that MLX can use, from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5] if len(fields) == 6 else ""
        if "libmkl_rt" in path:
            return Blas("mkl", Path(path))
        # numpy's wheel bundles libscipy_openblas64_ with renamed symbols: MLX cannot use it.
        if "openblas" in path and "scipy_openblas" not in path and "site-packages" not in path:
            return Blas("openblas", Path(path))
    return None


def blas_status() -> str:
    """One line for the startup banner: which BLAS serves MLX's matmuls."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return f"{mx.default_device()} (BLAS not used for matmul)"
    loaded = loaded_blas()
    if loaded is not None:
        marker = "libmkl_rt" if loaded.name == "mkl" else "openblas"
        how = "preloaded" if marker in os.environ.get("LD_PRELOAD", "") else "linked"
        why = f"; {os.environ[REASON_ENV]}" if os.environ.get(REASON_ENV) else ""
        waits = f", {WAIT_POLICY_ENV}={os.environ[WAIT_POLICY_ENV]}" if os.environ.get(WAIT_POLICY_ENV) else ""
        if loaded.name == "mkl":
            layer = os.environ.get(MKL_LAYER_ENV, "default")
            return f"MKL ({how}: {loaded.library}, {layer} threading{waits}{why})"
        return f"OpenBLAS ({how}: {loaded.library}{waits}{why})"
    found = mkl_blas() or openblas_blas()
    if found is None:
        hint = "pip install mkl (x86-64) or apt-get install libopenblas0-pthread"
    elif os.environ.get(OPT_OUT_ENV) or os.environ.get(CHOICE_ENV, "").strip().lower() == "none":
        hint = f"{CHOICE_ENV}=none or {OPT_OUT_ENV} is set; unset it"
    else:
        hint = f"set LD_PRELOAD={found.library}"
    return f"reference BLAS ({hint} for ~25x faster CPU matmul)"
