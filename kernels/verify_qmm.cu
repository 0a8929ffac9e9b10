// Verify-width quantized matmul for MLX's CUDA backend (mx.fast.cuda_kernel, compiled by NVRTC).
//
//   y (M, N) = x (M, K) @ dequant(w).T      M <= 32 rows, affine 4- or 8-bit, group 32/64/128
//   w (N, K*BITS/32) uint32, values packed little-end first; scales, biases (N, K/GS);
//   w[n, k] = scale[n, k/GS] * q[n, k] + bias[n, k/GS]
//
// Why: mx.quantized_matmul at 16 rows costs ~3x one row. Here each weight is read and dequantized
// once into registers, then multiplied against all M rows, so 16 rows cost about what 1 does.
//
// Tiling. A block is WN x WK warps and owns WN * NC output columns. Warp (wn, wk) owns NC columns;
// its lanes split K, 8 values per lane, and the WK warps of a column set split each staged span of
// WK * 256 values of K. x's span is staged once per block in shared memory (shared by all WN column
// warps); partial sums are reduced over lanes by shuffles and over the WK warps in shared memory.
//
// MLX builds the kernel signature from the names below; template constants arrive as
// `using T = ...; constexpr int MB = ...;` at the top of the body:
//   inputs x, w, scales, biases; output y; T = x's dtype, S = the scales', O = y's (it keys NVRTC's cache);
//   MB = row bucket (>= M, power of 2);
//   BITS (4 or 8); GS (group size); NC, WN, WK (tiling).
// The loader splits this file at the two markers: the header goes before the generated
// signature, the body inside it.

//@header
// 8 consecutive x values of type T as float, from shared memory holding raw T (U uint4 per 8).
template <typename X>
struct VqmmX;

template <>
struct VqmmX<float> {
  static constexpr int U = 2;
  __device__ __forceinline__ static void unpack(const uint4* p, float* f) {
    const uint4 a = p[0];
    const uint4 b = p[1];
    f[0] = __uint_as_float(a.x); f[1] = __uint_as_float(a.y);
    f[2] = __uint_as_float(a.z); f[3] = __uint_as_float(a.w);
    f[4] = __uint_as_float(b.x); f[5] = __uint_as_float(b.y);
    f[6] = __uint_as_float(b.z); f[7] = __uint_as_float(b.w);
  }
};

// bf16 -> f32 is exact by bit shift: element 2i is the low half of word i (little endian).
template <>
struct VqmmX<__nv_bfloat16> {
  static constexpr int U = 1;
  __device__ __forceinline__ static void unpack(const uint4* p, float* f) {
    const uint4 a = p[0];
    const unsigned int v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(v[i] << 16);
      f[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
    }
  }
};

template <>
struct VqmmX<__half> {
  static constexpr int U = 1;
  __device__ __forceinline__ static void unpack(const uint4* p, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 g = __half22float2(h[i]);
      f[2 * i] = g.x;
      f[2 * i + 1] = g.y;
    }
  }
};

__device__ __forceinline__ float vqmm_float(float v) { return v; }
__device__ __forceinline__ float vqmm_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float vqmm_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void vqmm_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void vqmm_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void vqmm_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

//@source
  constexpr int LV = 8;                  // x/w values per lane per step
  constexpr int STEP = 32 * LV;          // values of K per warp per step
  constexpr int SPAN = WK * STEP;        // values of K staged per block iteration
  constexpr int XU = VqmmX<T>::U;        // uint4 per 8 values of x
  constexpr int WORDS = BITS * LV / 32;  // uint32 per lane per column (1 for 4-bit, 2 for 8-bit)
  constexpr unsigned int QMASK = (1u << BITS) - 1u;

  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int kw = K * BITS / 32;  // uint32 per weight row
  const int kg = K / GS;         // groups per weight row
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int n0 = blockIdx.x * (WN * NC) + wn * NC;

  __shared__ uint4 xs[MB * (SPAN / LV) * XU];  // (MB, SPAN) raw T
  __shared__ float red[WK * WN * MB * NC];      // per-warp sums for the cross-warp reduction

  float acc[MB][NC];
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      acc[m][c] = 0.0f;
    }
  }

  for (int kc = 0; kc < K; kc += SPAN) {
    const int k0 = kc + wk * STEP + lane * LV;
    const bool active = k0 < K;  // K is a multiple of 32, so 8 values are all in or all out

    // Issue this step's weight loads before the barrier so they overlap the x staging.
    unsigned int q[NC][WORDS];
    float sc[NC];
    float bi[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int n = n0 + c;
      if (active && n < N) {
        const long long row = (long long)n * kw + k0 * BITS / 32;
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
          q[c][j] = w[row + j];
        }
        const long long g = (long long)n * kg + k0 / GS;
        sc[c] = vqmm_float(scales[g]);
        bi[c] = vqmm_float(biases[g]);
      } else {
#pragma unroll
        for (int j = 0; j < WORDS; ++j) {
          q[c][j] = 0u;
        }
        sc[c] = 0.0f;
        bi[c] = 0.0f;
      }
    }

    __syncthreads();  // every warp is done reading the previous span
    for (int i = threadIdx.x; i < MB * (SPAN / LV); i += blockDim.x) {
      const int m = i / (SPAN / LV);
      const int k = kc + (i % (SPAN / LV)) * LV;
      uint4* dst = xs + i * XU;
      if (m < M && k < K) {
        const uint4* src = reinterpret_cast<const uint4*>(x + (long long)m * K + k);
#pragma unroll
        for (int u = 0; u < XU; ++u) {
          dst[u] = src[u];
        }
      } else {
        uint4 zero;
        zero.x = zero.y = zero.z = zero.w = 0u;
#pragma unroll
        for (int u = 0; u < XU; ++u) {
          dst[u] = zero;
        }
      }
    }
    __syncthreads();

    if (active) {
      float wv[NC][LV];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
#pragma unroll
        for (int j = 0; j < LV; ++j) {
          const unsigned int word = q[c][(j * BITS) / 32];
          const unsigned int qv = (word >> ((j * BITS) % 32)) & QMASK;
          wv[c][j] = fmaf(sc[c], (float)qv, bi[c]);
        }
      }
      const int xi = (wk * STEP + lane * LV) / LV;  // this lane's 8-value slot within a row
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < M) {
          float xf[LV];
          VqmmX<T>::unpack(xs + (m * (SPAN / LV) + xi) * XU, xf);
#pragma unroll
          for (int c = 0; c < NC; ++c) {
#pragma unroll
            for (int j = 0; j < LV; ++j) {
              acc[m][c] = fmaf(xf[j], wv[c][j], acc[m][c]);
            }
          }
        }
      }
    }
  }

  // Sum over the lanes of each warp; every lane ends with the warp's sums.
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m < M) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        float v = acc[m][c];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          v += __shfl_xor_sync(0xffffffffu, v, off);
        }
        acc[m][c] = v;
      }
    }
  }
  // Lane (idx % 32) parks value idx, so the register index stays compile-time.
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (((m * NC + c) & 31) == lane) {
        red[(wk * WN + wn) * (MB * NC) + m * NC + c] = acc[m][c];
      }
    }
  }
  __syncthreads();

  // Sum over the WK warps of each column set and write y (M, N).
  for (int i = threadIdx.x; i < WN * MB * NC; i += blockDim.x) {
    const int r = i % (MB * NC);
    const int wn2 = i / (MB * NC);
    const int m = r / NC;
    const int n = blockIdx.x * (WN * NC) + wn2 * NC + r % NC;
    if (m < M && n < N) {
      float s = 0.0f;
      for (int v = 0; v < WK; ++v) {
        s += red[(v * WN + wn2) * (MB * NC) + r];
      }
      vqmm_store(y + (long long)m * N + n, s);
    }
  }
