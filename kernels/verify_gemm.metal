// Verify-width dense matmul for MLX's Metal backend (mx.fast.metal_kernel).
//
//   y (M, N) = x (M, K) @ w.T      M <= 32 rows; x, w and y of one dtype (float32, float16, bfloat16);
//   w (N, K) as nn.Linear stores it; K a multiple of 8 (checked by the caller).
//
// Same contract as verify_gemm.cu, written as verify_qmm.metal is: each weight is read once into
// registers and multiplied against all M rows with float32 FMAs (Apple GPUs' bandwidth is low
// enough next to their FMA rate that 32 rows stay memory-bound). A threadgroup is WN x WK
// simdgroups and owns WN * NC columns; simdgroup (wn, wk) owns NC columns, its lanes take 8
// consecutive values of K each (32 bytes of a bf16 row per lane, one row per simdgroup step), and
// the WK simdgroups interleave over K. x is read straight from device memory (small, cache
// resident), which keeps the loop free of barriers. Sums: simd_sum over lanes, threadgroup memory
// over the WK simdgroups.
//
// MLX writes the signature and passes template arguments as template parameters:
//   inputs x, w; output y; T = the dtype of all three; MB = row bucket (>= M); NC, WN, WK (tiling).
// The loader splits this file at the markers: the header goes before the signature.

//@header
#include <metal_stdlib>

//@source
  constexpr int LV = 8;          // values of K per lane per step
  constexpr int STEP = 32 * LV;  // values of K per simdgroup per step

  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
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

  for (int k0 = (wk * 32 + lane) * LV; k0 < K; k0 += WK * STEP) {  // K % 8 == 0: all 8 in range
    float wv[NC][LV];
    for (int c = 0; c < NC; ++c) {
      const int n = n0 + c;
      const long row = long(n) * K + k0;
      for (int j = 0; j < LV; ++j) {
        wv[c][j] = n < N ? static_cast<float>(w[row + j]) : 0.0f;
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
      y[long(m) * N + n] = static_cast<T>(s);
    }
  }
