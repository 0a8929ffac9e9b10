// Block attention for MLX's CUDA backend (mx.fast.cuda_kernel, compiled by NVRTC).
//
//   out (B, L, H, D) = softmax(scale * q k^T [causal]) v     q (B, H, L, D), k and v (B, Hkv, S, D)
//   L = 1..64 query rows (a decode step, a verify or draft block), any key length S, H a multiple of Hkv (GQA).
//   CAUSAL: row i sees keys 0 .. S - L + i (the block is the context's last L positions).
//   PADDED: batch row b sees keys from start[b] on (a left-padded batch: mlx-lm's BatchKVCache.left_padding);
//   every row must keep at least one key (start[b] < S - L + 1 when causal, < S otherwise).
//   TREE: the block is a draft tree's rows (L <= 128): row i sees every key before the block and block key
//   j only where bit j % 32 of bits[i, j / 32] is set (its ancestors and itself; bits (L, 4) uint32).
//
// Why: MLX 0.32's fused attention plans a cuDNN graph per exact (L, S), ~40 ms at each new key
// length, which speculative decoding meets every cycle; the explicit composition (two matmuls and a
// softmax) costs several launches per layer. Key length and strides are runtime arguments here, so
// NVRTC compiles one kernel per (T, D, CAUSAL, PADDED, TREE, WARPS) and a layer is one launch.
// A left-padded decode step (L = 1 over a batch of prompts of different lengths) otherwise needs
// fused attention with a (B, 1, 1, S) bool mask: on an H200 twice the cost of the unmasked call.
//
// Work split. A block owns one (batch, head, query row). Its warps take chunks of 32 keys in turn:
// each lane scores one key against the whole query row (kept in registers), the warp updates its
// online softmax (running max m, sum l) by shuffles, then accumulates the chunk's values with each
// lane owning D/32 output dims. The warps' (m, l, o) are merged through shared memory at the end.
// Inputs may be strided views (a KV cache's prefix): strides are in elements.
//
// MLX builds the signature from the names below; template constants arrive as
// `using T = ...; constexpr int D = ...;` at the top of the body:
//   inputs q, k, v, scale (1,) float32, start (B,) int32 (read only when PADDED), bits (L, 4) uint32 (read
//   only when TREE); output out; T = q's dtype; D = head dim (a multiple of 64); CAUSAL, PADDED, TREE (bool);
//   WARPS = warps per block.
// The loader splits this file at the two markers: the header goes before the generated
// signature, the body inside it.

//@header
#define BATTN_NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ float2 battn_f2(float x, float y) {
  float2 r;
  r.x = x;
  r.y = y;
  return r;
}

// Two values `stride` apart as floats; one pair load where they are adjacent and 4-byte aligned.
__device__ __forceinline__ float2 battn_pair(const float* p, long long stride) {
  return battn_f2(p[0], p[stride]);
}
__device__ __forceinline__ float2 battn_pair(const __half* p, long long stride) {
  if (stride == 1 && (reinterpret_cast<unsigned long long>(p) & 3) == 0) {
    return __half22float2(*reinterpret_cast<const __half2*>(p));
  }
  return battn_f2(__half2float(p[0]), __half2float(p[stride]));
}
__device__ __forceinline__ float2 battn_pair(const __nv_bfloat16* p, long long stride) {
  if (stride == 1 && (reinterpret_cast<unsigned long long>(p) & 3) == 0) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  return battn_f2(__bfloat162float(p[0]), __bfloat162float(p[stride]));
}

__device__ __forceinline__ void battn_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void battn_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void battn_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

//@source
  constexpr int VPT = D / 32;  // output dims per lane
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int h = blockIdx.x;
  const int row = blockIdx.y;
  const int b = blockIdx.z;
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int Hkv = k_shape[1];
  const int S = k_shape[2];
  const int kvh = h / (H / Hkv);
  const int limit = CAUSAL ? S - L + row + 1 : S;  // keys this row sees: first .. limit - 1
  const int first = PADDED ? start[b * start_strides[0]] : 0;
  const float scale_log2 = scale[0] * 1.4426950408889634f;  // exp2 below, so fold log2(e) in
  const int block_first = S - L;  // TREE: keys from here on are the tree's rows
  const unsigned int* row_bits = TREE ? bits + row * bits_strides[0] : nullptr;

  // The whole query row, pre-scaled, in every lane: each lane scores its own key.
  const T* qp = q + b * q_strides[0] + h * q_strides[1] + row * q_strides[2];
  float qv[D];
#pragma unroll
  for (int d = 0; d < D; d += 2) {
    const float2 t = battn_pair(qp + d * q_strides[3], q_strides[3]);
    qv[d] = t.x * scale_log2;
    qv[d + 1] = t.y * scale_log2;
  }
  const T* kb = k + b * k_strides[0] + kvh * k_strides[1];
  const T* vb = v + b * v_strides[0] + kvh * v_strides[1] + lane * VPT * v_strides[3];

  float m = BATTN_NEG_INF;  // running max of this warp's scores (log2 units)
  float l = 0.0f;  // running sum of exp2(score - m)
  float o[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    o[i] = 0.0f;
  }
  for (int base = first + warp * 32; base < limit; base += WARPS * 32) {
    const int j = base + lane;
    float s = BATTN_NEG_INF;
    bool seen = j < limit;
    if (TREE && seen && j >= block_first) {
      const int t = j - block_first;
      seen = (row_bits[(t >> 5) * bits_strides[1]] >> (t & 31)) & 1u;
    }
    if (seen) {
      const T* kj = kb + j * k_strides[2];
      float acc = 0.0f;
#pragma unroll
      for (int d = 0; d < D; d += 2) {
        const float2 t = battn_pair(kj + d * k_strides[3], k_strides[3]);
        acc = fmaf(qv[d], t.x, fmaf(qv[d + 1], t.y, acc));
      }
      s = acc;
    }
    float chunk_max = s;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, off));
    }
    if (TREE && chunk_max == BATTN_NEG_INF) {
      continue;  // every key of this chunk is another branch's (warp-uniform: the max is the warp's)
    }
    const float m_new = fmaxf(m, chunk_max);  // finite: a chunk holds a seen key (key `base` < limit, or TREE's check)
    const float p = exp2f(s - m_new);         // 0 for lanes past the limit
    const float rescale = exp2f(m - m_new);   // 0 on the first chunk (m = BATTN_NEG_INF)
    float p_sum = p;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      p_sum += __shfl_xor_sync(0xffffffffu, p_sum, off);
    }
    l = l * rescale + p_sum;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      o[i] *= rescale;
    }
    const int n = min(32, limit - base);  // warp-uniform
    for (int t = 0; t < n; ++t) {
      const float pt = __shfl_sync(0xffffffffu, p, t);
      const T* vj = vb + (base + t) * v_strides[2];
#pragma unroll
      for (int i = 0; i < VPT; i += 2) {
        const float2 w = battn_pair(vj + i * v_strides[3], v_strides[3]);
        o[i] = fmaf(pt, w.x, o[i]);
        o[i + 1] = fmaf(pt, w.y, o[i + 1]);
      }
    }
    m = m_new;
  }

  // Merge the warps' softmax states: out = sum_w o_w 2^(m_w - M) / sum_w l_w 2^(m_w - M).
  __shared__ float warp_m[WARPS];
  __shared__ float warp_l[WARPS];
  __shared__ float warp_o[WARPS * D];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    warp_o[warp * D + lane * VPT + i] = o[i];
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += WARPS * 32) {
    float top = BATTN_NEG_INF;
    for (int w = 0; w < WARPS; ++w) {
      top = fmaxf(top, warp_m[w]);
    }
    float total = 0.0f;
    float acc = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      if (warp_l[w] > 0.0f) {  // a warp whose chunks all lay past the limit holds nothing
        const float f = exp2f(warp_m[w] - top);
        total += warp_l[w] * f;
        acc += warp_o[w * D + d] * f;
      }
    }
    battn_store(out + (((long long)b * L + row) * H + h) * D + d, acc / total);
  }
