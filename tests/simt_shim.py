"""A CPU stand-in for GPU kernels: CUDA or Metal kernel sources compiled by g++ and run with one
thread per GPU thread (block and warp barriers, shuffles through shared lanes), so the kernels in
kernels/ get their numerics checked where no GPU is (tests/test_verify_matmul.py,
tests/test_attention_kernel.py). Slow by design: tiny shapes only."""

from __future__ import annotations

import numpy as np

SHIM_COMMON = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>
#include <vector>
static std::unique_ptr<std::barrier<>> g_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
static float g_lanes[1024];
static thread_local unsigned g_tid;
// one barrier for the block, one per warp: shuffles wait for their own warp only, as on a GPU
inline void setup_barriers(int threads) {
  g_barrier = std::make_unique<std::barrier<>>(threads);
  g_warp_barriers.clear();
  for (int w = 0; w < threads / 32; ++w) g_warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
}
inline void block_sync() { g_barrier->arrive_and_wait(); }
inline void warp_sync() { g_warp_barriers[g_tid / 32]->arrive_and_wait(); }
inline float lane_read(float v, unsigned src) {
  g_lanes[g_tid] = v; warp_sync();
  float r = g_lanes[(g_tid & ~31u) | (src & 31u)]; warp_sync(); return r;
}
inline float lane_xor(float v, int off) { return lane_read(v, (g_tid & 31u) ^ off); }
inline float bits_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned float_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline uint16_t to_bf16(float f) { unsigned u = float_bits(f); u += 0x7fffu + ((u >> 16) & 1u); return u >> 16; }
"""

SHIM_CUDA = SHIM_COMMON + r"""
struct uint4 { unsigned int x, y, z, w; };
struct float2 { float x, y; };
struct __nv_bfloat16 { uint16_t b; };
struct __half { uint16_t b; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
#define inf INFINITY
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim;
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { block_sync(); }
inline float __shfl_xor_sync(unsigned, float v, int off) { return lane_xor(v, off); }
inline float __shfl_sync(unsigned, float v, int src) { return lane_read(v, src); }
using std::min;
inline float __uint_as_float(unsigned u) { return bits_float(u); }
inline unsigned __float_as_uint(float f) { return float_bits(f); }
inline unsigned short __half_as_ushort(__half h) { return h.b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.b; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.b = u; return h; }
inline float __int_as_float(unsigned u) { return bits_float(u); }
inline float __half2float(__half h) { _Float16 v; memcpy(&v, &h.b, 2); return (float)v; }
inline __half __float2half(float f) { _Float16 v = (_Float16)f; __half h; memcpy(&h.b, &v, 2); return h; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 v) { return bits_float((unsigned)v.b << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {to_bf16(f)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
#define SET_THREAD(t, b) (threadIdx.x = (t), blockIdx.x = (b))
#define SET_BLOCK(t, bx, by, bz) (threadIdx.x = (t), blockIdx.x = (bx), blockIdx.y = (by), blockIdx.z = (bz))
"""

SHIM_METAL = SHIM_COMMON + r"""
typedef unsigned int uint;
struct Uint3 { unsigned x = 0, y = 0, z = 0; };
static thread_local Uint3 threadgroup_position_in_grid;
static thread_local unsigned thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
    thread_index_in_threadgroup;
#define device
#define threadgroup static
namespace metal {
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { block_sync(); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float simd_sum(float v) {
  g_lanes[g_tid] = v; warp_sync();
  float s = 0; for (unsigned l = 0; l < 32; ++l) s += g_lanes[(g_tid & ~31u) | l];
  warp_sync(); return s;
}
}
struct bfloat16_t {
  uint16_t b;
  bfloat16_t() = default;
  bfloat16_t(float f) : b(to_bf16(f)) {}
  operator float() const { return bits_float((unsigned)b << 16); }
};
typedef _Float16 float16_t;
#define SET_THREAD(t, b) (thread_index_in_threadgroup = (t), thread_index_in_simdgroup = (t) % 32, \
    simdgroup_index_in_threadgroup = (t) / 32, threadgroup_position_in_grid.x = (b))
"""

C_TYPES = {  # dtype -> (CUDA type, Metal type, numpy storage)
    "float32": ("float", "float", np.float32),
    "float16": ("__half", "float16_t", np.float16),
    "bfloat16": ("__nv_bfloat16", "bfloat16_t", np.uint16),
}


def round_to(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw storage, float64 value) of `values` rounded to `dtype` (bf16 round-to-nearest-even)."""
    v = values.astype(np.float32)
    if dtype == "bfloat16":
        u = v.view(np.uint32).astype(np.uint64)
        raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return raw, (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    raw = v.astype(C_TYPES[dtype][2])
    return raw, raw.astype(np.float64)


def stored_to_float(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return raw.astype(np.float64)
