// Verify-width quantized matmul for MLX's Metal backend (mx.fast.metal_kernel).
//
//   y (M, N) = x (M, K) @ dequant(w).T      M <= 32 rows, affine 4- or 8-bit, group 32/64/128
//   w (N, K*BITS/32) uint32, values packed little-end first; scales, biases (N, K/GS);
//   w[n, k] = scale[n, k/GS] * q[n, k] + bias[n, k/GS]
//
// Same idea as verify_qmm.cu: each weight is read and dequantized once into registers and
// multiplied against all M rows. A threadgroup is WN x WK simdgroups and owns WN * NC columns;
// simdgroup (wn, wk) owns NC columns, its lanes take 8 values of K each, and the WK simdgroups
// interleave over K. x is read straight from device memory (small, cache resident), which keeps
// this kernel free of staging barriers. Sums: simd_sum over lanes, threadgroup memory over WK.
//
// MLX writes the signature and passes template arguments as template parameters:
//   inputs x, w, scales, biases; output y; T = x's dtype, S = the scales', O = y's; MB = row bucket (>= M);
//   BITS (4 or 8); GS (group size); NC, WN, WK (tiling).
// The loader splits this file at the markers: the header goes before the signature.

//@header
#include <metal_stdlib>

//@source
  constexpr int LV = 8;                  // values per lane per step
  constexpr int STEP = 32 * LV;          // values of K per simdgroup per step
  constexpr int WORDS = BITS * LV / 32;  // uint32 per lane per column
  constexpr uint QMASK = (1u << BITS) - 1u;

  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int kw = K * BITS / 32;
  const int kg = K / GS;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int wn = sg % WN;
  const int wk = sg / WN;
  const int tile = int(threadgroup_position_in_grid.x) * (WN * NC);
  const int n0 = tile + wn * NC;

  threadgroup float red[WK * WN * MB * NC];

  float acc[MB][NC];
  for (int m = 0; m < MB; ++m) {
    for (int c = 0; c < NC; ++c) {
      acc[m][c] = 0.0f;
    }
  }

  for (int k0 = (wk * 32 + lane) * LV; k0 < K; k0 += WK * STEP) {
    float wv[NC][LV];
    for (int c = 0; c < NC; ++c) {
      const int n = n0 + c;
      uint q[WORDS];
      float sc = 0.0f;
      float bi = 0.0f;
      if (n < N) {
        const long row = long(n) * kw + k0 * BITS / 32;
        for (int j = 0; j < WORDS; ++j) {
          q[j] = w[row + j];
        }
        const long g = long(n) * kg + k0 / GS;
        sc = static_cast<float>(scales[g]);
        bi = static_cast<float>(biases[g]);
      } else {
        for (int j = 0; j < WORDS; ++j) {
          q[j] = 0u;
        }
      }
      for (int j = 0; j < LV; ++j) {
        const uint qv = (q[(j * BITS) / 32] >> ((j * BITS) % 32)) & QMASK;
        wv[c][j] = metal::fma(sc, float(qv), bi);
      }
    }
    for (int m = 0; m < MB; ++m) {
      if (m < M) {
        const long xo = long(m) * K + k0;
        float xf[LV];
        for (int j = 0; j < LV; ++j) {
          xf[j] = static_cast<float>(x[xo + j]);
        }
        for (int c = 0; c < NC; ++c) {
          for (int j = 0; j < LV; ++j) {
            acc[m][c] = metal::fma(xf[j], wv[c][j], acc[m][c]);
          }
        }
      }
    }
  }

  for (int m = 0; m < MB; ++m) {
    if (m < M) {
      for (int c = 0; c < NC; ++c) {
        const float v = metal::simd_sum(acc[m][c]);
        if (lane == 0) {
          red[(wk * WN + wn) * (MB * NC) + m * NC + c] = v;
        }
      }
    }
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  const int tid = int(thread_index_in_threadgroup);
  for (int i = tid; i < WN * MB * NC; i += WN * WK * 32) {
    const int r = i % (MB * NC);
    const int wn2 = i / (MB * NC);
    const int m = r / NC;
    const int n = tile + wn2 * NC + r % NC;
    if (m < M && n < N) {
      float s = 0.0f;
      for (int v = 0; v < WK; ++v) {
        s += red[(v * WN + wn2) * (MB * NC) + r];
      }
      y[long(m) * N + n] = static_cast<O>(s);
    }
  }
