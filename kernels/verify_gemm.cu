// Verify-width dense matmul for MLX's CUDA backend (mx.fast.cuda_kernel, compiled by NVRTC).
//
//   y (M, N) = x (M, K) @ w.T      M <= 32 rows; x, w and y all bfloat16 or all float16;
//   w (N, K) as nn.Linear stores it (a packed projection or an LM head is just a larger N);
//   K a multiple of 8 (checked by the caller, engine/backend/verify_gemm.py).
//
// Why: MLX 0.32's bf16 GEMM at 2-16 rows runs well below the 1-row GEMV's bandwidth. Here each
// weight is read from HBM once, with 16-byte streaming loads, and multiplied against all M rows.
// Math: tensor cores (mma.sync m16n8k16, float32 accumulation), because CUDA-core FMAs at 16-32
// rows (16-32 FMA per 2-byte weight) cost as much as reading the weights; the mma keeps it ~10x below.
//
// Roles: the weights are the mma's A operand (16 weight rows = 16 output columns per tile) and x^T
// its B operand (8 x rows per tile), so rows 2..8 need one x tile and M = 32 four. Lane (g = lane/4,
// t = lane%4) loads 8 consecutive K values (one uint4) of weight rows g and g + 8 and of x row g: 4
// lanes read 64 contiguous bytes of a row. The dot product does not care how K is ordered as long as
// A and B agree, so those 8 values feed two mmas as they lie: the first takes values 0-3 as its
// logical k {2t, 2t+1, 2t+8, 2t+9}, the second values 4-7; no shuffles, no shared-memory staging.
//
// Tiling. A block is WN x WK warps and owns WN * NC output columns. Warp (wn, wk) owns NC columns
// (NC / 16 weight tiles) and takes spans of KU * 32 values of K in turn with the other WK warps of its
// column set; the next span's weights are loaded before the current span is multiplied (registers
// double-buffer). x is read straight from global memory: it is small and stays in L1/L2. Partial sums
// meet in shared memory, summed over the WK warps and written as coalesced rows of y.
//
// MLX builds the signature from the names below; template constants arrive as
// `using T = ...; constexpr int MB = ...;` at the top of the body:
//   inputs x, w; output y; T = the dtype of all three; MB = row bucket (>= M, a multiple of 8);
//   NC (a multiple of 16), WN, WK, KU (tiling).
// The loader splits this file at the two markers: the header goes before the generated
// signature, the body inside it. DFLASH_SIMT_SHIM: the CPU test shim supplies its own VgemmMma.

//@header
__device__ __forceinline__ uint4 vgemm_zero() {
  uint4 z;
  z.x = z.y = z.z = z.w = 0u;
  return z;
}

// 8 consecutive 2-byte values as one uint4: one 16-byte load where p is aligned, else 8 loads.
// `stream`: the weights are read once, so they take the evict-first path and leave L1 to x.
template <typename T>
__device__ __forceinline__ uint4 vgemm_load8(const T* p, bool vec, bool stream) {
  if (vec) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    return stream ? __ldcs(q) : *q;
  }
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
  uint4 r;
  r.x = (unsigned int)s[0] | ((unsigned int)s[1] << 16);
  r.y = (unsigned int)s[2] | ((unsigned int)s[3] << 16);
  r.z = (unsigned int)s[4] | ((unsigned int)s[5] << 16);
  r.w = (unsigned int)s[6] | ((unsigned int)s[7] << 16);
  return r;
}

__device__ __forceinline__ void vgemm_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void vgemm_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// d (16x8, float32) += a (16x16, row-major) * b (16x8, column-major); fragments as PTX lays them out.
#ifndef DFLASH_SIMT_SHIM
template <typename T>
struct VgemmMma;

#define VGEMM_MMA(TYPE, PTX)                                                                                     \
  template <>                                                                                                    \
  struct VgemmMma<TYPE> {                                                                                        \
    __device__ __forceinline__ static void run(float (&d)[4], unsigned int a0, unsigned int a1, unsigned int a2, \
                                               unsigned int a3, unsigned int b0, unsigned int b1) {              \
      asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "   \
          "{%0,%1,%2,%3};\n"                                                                                    \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                       \
          : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                               \
    }                                                                                                            \
  };
VGEMM_MMA(__nv_bfloat16, "bf16")
VGEMM_MMA(__half, "f16")
#undef VGEMM_MMA
#endif

//@source
  static_assert(sizeof(T) == 2, "verify_gemm.cu takes bfloat16 or float16");
  static_assert(NC % 16 == 0 && MB % 8 == 0, "NC: whole 16-column tiles; MB: whole 8-row tiles");
  constexpr int WT = NC / 16;       // weight tiles (16 columns) per warp
  constexpr int XT = MB / 8;        // x tiles (8 rows)
  constexpr int CHUNK = 32;         // K values per two mmas: 4 lanes x 8
  constexpr int SPAN = KU * CHUNK;  // K values a warp takes per step
  constexpr int CB = WN * NC;       // columns per block

  const int M = x_shape[0];
  const int K = x_shape[1];
  const int N = w_shape[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * CB + wn * NC;
  // K % 8 == 0 keeps every row 16-byte aligned when the base pointers are (views may not be)
  const bool vec = ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(w)) & 15ull) == 0;

  __shared__ float red[WK * MB * CB];  // (WK, MB, CB) partial sums

  float acc[WT][XT][4];
#pragma unroll
  for (int i = 0; i < WT; ++i) {
#pragma unroll
    for (int j = 0; j < XT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = 0.0f;
      }
    }
  }

  // This lane's weight rows: tile i, half h (row g or g + 8); zero past N or past K.
  auto load_w = [&](uint4 (&dst)[KU][WT][2], int base) {
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int k = base + u * CHUNK + t * 8;
#pragma unroll
      for (int i = 0; i < WT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = n0 + i * 16 + h * 8 + g;
          dst[u][i][h] = (n < N && k < K) ? vgemm_load8(w + (long long)n * K + k, vec, true) : vgemm_zero();
        }
      }
    }
  };

  uint4 wcur[KU][WT][2];
  load_w(wcur, wk * SPAN);
  for (int base = wk * SPAN; base < K; base += WK * SPAN) {
    uint4 wnext[KU][WT][2];
    load_w(wnext, base + WK * SPAN);  // in flight while this span is multiplied
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int k = base + u * CHUNK + t * 8;
      uint4 xb[XT];
#pragma unroll
      for (int j = 0; j < XT; ++j) {
        const int m = j * 8 + g;
        xb[j] = (m < M && k < K) ? vgemm_load8(x + (long long)m * K + k, vec, false) : vgemm_zero();
      }
#pragma unroll
      for (int i = 0; i < WT; ++i) {
#pragma unroll
        for (int j = 0; j < XT; ++j) {
          VgemmMma<T>::run(acc[i][j], wcur[u][i][0].x, wcur[u][i][1].x, wcur[u][i][0].y, wcur[u][i][1].y,
                           xb[j].x, xb[j].y);
          VgemmMma<T>::run(acc[i][j], wcur[u][i][0].z, wcur[u][i][1].z, wcur[u][i][0].w, wcur[u][i][1].w,
                           xb[j].z, xb[j].w);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < KU; ++u) {
#pragma unroll
      for (int i = 0; i < WT; ++i) {
        wcur[u][i][0] = wnext[u][i][0];
        wcur[u][i][1] = wnext[u][i][1];
      }
    }
  }

  // acc[i][j][e]: column wn * NC + 16 i + g + 8 (e / 2) of the block, x row 8 j + 2 t + (e % 2)
#pragma unroll
  for (int i = 0; i < WT; ++i) {
#pragma unroll
    for (int j = 0; j < XT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = j * 8 + t * 2 + (e & 1);
        const int c = wn * NC + i * 16 + g + (e >> 1) * 8;
        if (m < M) {
          red[(wk * MB + m) * CB + c] = acc[i][j][e];
        }
      }
    }
  }
  __syncthreads();

  for (int r = threadIdx.x; r < MB * CB; r += blockDim.x) {
    const int m = r / CB;
    const int c = r % CB;
    const int n = blockIdx.x * CB + c;
    if (m < M && n < N) {
      float s = 0.0f;
#pragma unroll
      for (int v = 0; v < WK; ++v) {
        s += red[(v * MB + m) * CB + c];
      }
      vgemm_store(y + (long long)m * N + n, s);
    }
  }
