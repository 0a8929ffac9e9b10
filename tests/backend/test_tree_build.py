"""kernels/tree_build.cu on a CPU SIMT shim (tests/simt_shim.py): its trees equal engine/decode/tree.build_tree's.

On CUDA, engine/decode/tree.tree_builder runs check_tree_kernel before trees are built with the kernel;
here the same check runs on the kernel source compiled by g++, ties and the spine included, and a kernel
with a bug fails it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from simt_shim import SHIM_CUDA

from engine.backend.tree_build import MAX_SCORED, TreeKernel
from engine.backend.verify_matmul import read_kernel_source
from engine.decode.tree import build_tree, check_tree_kernel, device_tree, lattice_size

MAIN = r"""
#include <cstdlib>
template <typename X> std::vector<X> load(const char* path, size_t n) {
  std::vector<X> v(n); std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(v.data()), n * sizeof(X));
  return v;
}
template <typename X> void save(const char* path, const std::vector<X>& v) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(X));
}
int main(int argc, char** argv) {
  int L = atoi(argv[1]), K = atoi(argv[2]), N = atoi(argv[3]), S = atoi(argv[4]);
  auto ids = load<int>(argv[5], L * K); auto lp = load<float>(argv[6], L * K);
  std::vector<int> dims = {L, K, N, S}, tokens(N), parents(N), depths(N), pops(N), spine(1);
  std::vector<uint32_t> bits((N + 1) * 4); std::vector<uint8_t> ancestors((N + 1) * (N + 1)); std::vector<float> scores(S);
  setup_barriers(32);
  SET_THREAD(0, 0);
  tree_build(ids.data(), lp.data(), dims.data(), tokens.data(), parents.data(), depths.data(), pops.data(),
             bits.data(), ancestors.data(), scores.data(), spine.data());
  std::string out = argv[7];
  save((out + "tokens").c_str(), tokens); save((out + "parents").c_str(), parents); save((out + "depths").c_str(), depths);
  save((out + "pops").c_str(), pops); save((out + "bits").c_str(), bits); save((out + "ancestors").c_str(), ancestors);
  save((out + "scores").c_str(), scores); save((out + "spine").c_str(), spine);
}
"""


def shim_kernel(tmp: Path, mutate: tuple[str, str] | None = None) -> TreeKernel:
    """A TreeKernel (engine/backend/tree_build.py) that runs the kernel source on the shim, one thread."""
    header, body = read_kernel_source("tree_build.cu")
    if mutate is not None:
        assert mutate[0] in header + body, mutate[0]
        header, body = (part.replace(mutate[0], mutate[1]) for part in (header, body))
    programs = {}
    for spine in (False, True):
        source = SHIM_CUDA + header + (
            "void tree_build(const int* ids, const float* lp, const int* dims, int* tokens, int* parents, int* depths,"
            " int* pops, uint32_t* bits, uint8_t* ancestors, float* scores, int* spine) {\n"
            f"  constexpr bool SPINE = {str(spine).lower()};\n{body}\n}}\n") + MAIN
        path = tmp / f"tree_{spine}.cpp"
        path.write_text(source)
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-w", "-o", str(path.with_suffix("")), str(path)],
                       check=True, capture_output=True, text=True)
        programs[spine] = path.with_suffix("")

    def launch(ids: mx.array, logprobs: mx.array, budget: int, scored: int, spine: bool) -> tuple[mx.array, ...]:
        depth, k = ids.shape
        np.array(ids, dtype=np.int32).tofile(tmp / "ids")
        np.array(logprobs, dtype=np.float32).tofile(tmp / "lp")
        subprocess.run([str(programs[spine]), str(depth), str(k), str(budget), str(scored), str(tmp / "ids"),
                        str(tmp / "lp"), str(tmp / "out_")], check=True, timeout=60)
        def read(name: str, dtype: type) -> np.ndarray:
            return np.fromfile(tmp / f"out_{name}", dtype=dtype)

        n = budget + 1
        return (mx.array(read("tokens", np.int32)), mx.array(read("parents", np.int32)), mx.array(read("depths", np.int32)),
                mx.array(read("pops", np.int32)), mx.array(read("bits", np.uint32).reshape(n, 4)),
                mx.array(read("ancestors", np.uint8).reshape(n, n)), mx.array(read("scores", np.float32)),
                mx.array(read("spine", np.int32)))

    return launch


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20) for the SIMT shim")


@needs_gxx
def test_the_kernels_trees_equal_build_trees(tmp_path: Path) -> None:
    kernel = shim_kernel(tmp_path)
    assert check_tree_kernel(kernel) is None
    assert check_tree_kernel(kernel, seed=7) is None


@needs_gxx
def test_a_tree_of_the_whole_lattice_and_the_most_pops_scored(tmp_path: Path) -> None:
    kernel = shim_kernel(tmp_path)
    ids, lp = np.arange(6, dtype=np.int32).reshape(2, 3), np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]], np.float32))
    budget = lattice_size(2, 3)  # 3 + 9 nodes: the heap empties
    want = build_tree(ids.tolist(), lp.tolist(), budget)
    got = device_tree(kernel, mx.array(ids), mx.array(lp), budget, budget).on_host()
    assert got.pops == want.pops and np.array_equal(np.array(got.parents), np.array(want.parents))
    rng = np.random.default_rng(3)
    lp = np.sort(-rng.exponential(1.0, (15, 64)).astype(np.float32), axis=1)[:, ::-1].copy()
    ids = rng.integers(0, 1000, (15, 64)).astype(np.int32)
    want = build_tree(ids.tolist(), lp.tolist(), 64, scored=MAX_SCORED)
    got = device_tree(kernel, mx.array(ids), mx.array(lp), 64, MAX_SCORED).on_host()
    assert got.pops == want.pops and np.allclose(got.scores, want.scores, rtol=1e-6)


@needs_gxx
@pytest.mark.parametrize("bug", [("ra[i] < rb[i]", "ra[i] > rb[i]"),  # ties broken the other way
                                 ("chain == (pass == 0)", "chain == (pass == 1)"),  # the spine not first
                                 ("|= 1u << (row % 32)", "|= 0u")])  # rows not their own ancestors
def test_a_kernel_with_a_bug_fails_the_check(tmp_path: Path, bug: tuple[str, str]) -> None:
    assert check_tree_kernel(shim_kernel(tmp_path, mutate=bug)) is not None
