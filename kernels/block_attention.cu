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
// GROUPED work split (where a KV head serves several query heads, as GQA's 4 to 8): a block owns one (batch,
// KV head, query row), one warp per query head of the group (WARPS = H / Hkv). The block stages each tile of
// 32 keys and values in shared memory with coalesced loads, and every warp scores its head against the tile
// from there: K and V are read once per group and row, where the split below reads them once per head and
// row, with a lane's own key row fetched 4 bytes at a time. On an H100 (Qwen3-8B shape, 32/8 heads, 16 rows
// over ~300 keys) the split below took ~110 us a layer inside a forward, the explicit composition ~20.
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
//   only when TREE); output out; T = q's dtype; D = head dim (a multiple of 64); CAUSAL, PADDED, TREE, GROUPED
//   (bool); WARPS = warps per block.
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

// GROUPED stages tiles as 32-bit words: one float, or two 16-bit values (the lower-addressed in the low half).
__device__ __forceinline__ unsigned int battn_word(const float* p, long long) { return __float_as_uint(p[0]); }
__device__ __forceinline__ unsigned int battn_word(const __half* p, long long stride) {
  return (unsigned int)__half_as_ushort(p[0]) | ((unsigned int)__half_as_ushort(p[stride]) << 16);
}
__device__ __forceinline__ unsigned int battn_word(const __nv_bfloat16* p, long long stride) {
  return (unsigned int)__bfloat16_as_ushort(p[0]) | ((unsigned int)__bfloat16_as_ushort(p[stride]) << 16);
}
// A staged word's values as floats, chosen by the element type's pointer (the second is unused for float).
__device__ __forceinline__ float2 battn_unword(unsigned int w, const float*) {
  return battn_f2(__uint_as_float(w), 0.0f);
}
__device__ __forceinline__ float2 battn_unword(unsigned int w, const __half*) {
  return battn_f2(__half2float(__ushort_as_half((unsigned short)(w & 0xffffu))),
                  __half2float(__ushort_as_half((unsigned short)(w >> 16))));
}
__device__ __forceinline__ float2 battn_unword(unsigned int w, const __nv_bfloat16*) {
  return battn_f2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

// Whether a row sees key j (< limit): TREE's block keys by the row's ancestor bits.
__device__ __forceinline__ bool battn_seen(int j, int limit, bool tree, int block_first, const unsigned int* row_bits,
                                           long long word_stride) {
  if (!tree || j >= limit || j < block_first) {
    return j < limit;
  }
  const int t = j - block_first;
  return (row_bits[(t >> 5) * word_stride] >> (t & 31)) & 1u;
}

__device__ __forceinline__ float battn_warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  }
  return v;
}

// A chunk of a warp's scores (one a lane, log2 units) into its online softmax (running max m, sum l): returns
// this lane's weight and sets `rescale` for the running output. The chunk's max must be finite (a seen key).
__device__ __forceinline__ float battn_softmax_step(float s, float chunk_max, float& m, float& l, float& rescale) {
  const float m_new = fmaxf(m, chunk_max);
  const float p = exp2f(s - m_new);  // 0 for lanes that see no key
  rescale = exp2f(m - m_new);        // 0 on the first chunk (m = BATTN_NEG_INF)
  float p_sum = p;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    p_sum += __shfl_xor_sync(0xffffffffu, p_sum, off);
  }
  l = l * rescale + p_sum;
  m = m_new;
  return p;
}

__device__ __forceinline__ void battn_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void battn_store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void battn_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

//@source
  constexpr int VPT = D / 32;  // output dims per lane
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = blockIdx.y;
  const int b = blockIdx.z;
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int Hkv = k_shape[1];
  const int S = k_shape[2];
  const int h = GROUPED ? blockIdx.x * WARPS + warp : blockIdx.x;  // GROUPED: WARPS = H / Hkv
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
  const T* vb = v + b * v_strides[0] + kvh * v_strides[1];
  float m = BATTN_NEG_INF;  // running max of this warp's scores (log2 units)
  float l = 0.0f;  // running sum of exp2(score - m)
  float o[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    o[i] = 0.0f;
  }

  if (GROUPED) {
    constexpr int TILE = 32;  // keys per staged tile: one per lane
    constexpr int VW = 4 / sizeof(T);  // values a 32-bit word holds
    constexpr int KW = D / VW;         // words a key (or value) row holds
    constexpr int QW = KW / 4;         // 16-byte vectors a row holds
    constexpr int THREADS = WARPS * 32;
    constexpr int BATCH = 4;           // vectors of K and of V a thread has in flight: one load latency a tile
    // +1: lane j reads key row j, so a row pitch of KW + 1 words spreads the banks; lane l reads value words
    // l, l + 32, ... (sized 1 in the other variants: static shared memory counts whether a branch runs or not)
    __shared__ unsigned int ks[GROUPED ? TILE : 1][GROUPED ? KW + 1 : 1];
    __shared__ unsigned int vs[GROUPED ? TILE : 1][GROUPED ? KW : 1];
    // 16-byte loads where rows are contiguous and aligned (a KV cache's are); word by word otherwise
    const bool wide = k_strides[3] == 1 && v_strides[3] == 1 && (k_strides[2] * (long long)sizeof(T)) % 16 == 0 &&
                      (v_strides[2] * (long long)sizeof(T)) % 16 == 0 &&
                      (reinterpret_cast<unsigned long long>(kb) & 15) == 0 &&
                      (reinterpret_cast<unsigned long long>(vb) & 15) == 0;
    // o[i * VW + c] holds dim (lane + 32 i) * VW + c: the value words lane, lane + 32, ...
    for (int base = first; base < limit; base += TILE) {  // block-uniform: every warp has this row's limit
      if (wide) {
        for (int first_vec = threadIdx.x; first_vec < TILE * QW; first_vec += THREADS * BATCH) {
          uint4 kr[BATCH];
          uint4 vr[BATCH];
#pragma unroll
          for (int i = 0; i < BATCH; ++i) {  // every load issued before any is used
            const int idx = first_vec + i * THREADS;
            const int j = base + idx / QW;
            kr[i].x = kr[i].y = kr[i].z = kr[i].w = 0u;
            vr[i] = kr[i];
            if (idx < TILE * QW && j < limit) {
              kr[i] = reinterpret_cast<const uint4*>(kb + j * k_strides[2])[idx % QW];
              vr[i] = reinterpret_cast<const uint4*>(vb + j * v_strides[2])[idx % QW];
            }
          }
#pragma unroll
          for (int i = 0; i < BATCH; ++i) {
            const int idx = first_vec + i * THREADS;
            if (idx < TILE * QW) {
              const int t = idx / QW;
              const int w = (idx % QW) * 4;
              ks[t][w] = kr[i].x;
              ks[t][w + 1] = kr[i].y;
              ks[t][w + 2] = kr[i].z;
              ks[t][w + 3] = kr[i].w;
              vs[t][w] = vr[i].x;
              vs[t][w + 1] = vr[i].y;
              vs[t][w + 2] = vr[i].z;
              vs[t][w + 3] = vr[i].w;
            }
          }
        }
      } else {
        for (int idx = threadIdx.x; idx < TILE * KW; idx += THREADS) {
          const int t = idx / KW;
          const int w = idx % KW;
          const int j = base + t;
          const bool in = j < limit;
          ks[t][w] = in ? battn_word(kb + j * k_strides[2] + w * VW * k_strides[3], k_strides[3]) : 0u;
          vs[t][w] = in ? battn_word(vb + j * v_strides[2] + w * VW * v_strides[3], v_strides[3]) : 0u;
        }
      }
      __syncthreads();
      float s = BATTN_NEG_INF;
      if (battn_seen(base + lane, limit, TREE, block_first, row_bits, bits_strides[1])) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < KW; ++w) {
          const float2 kk = battn_unword(ks[lane][w], static_cast<const T*>(nullptr));
          acc = VW == 2 ? fmaf(qv[2 * w], kk.x, fmaf(qv[2 * w + 1], kk.y, acc)) : fmaf(qv[w], kk.x, acc);
        }
        s = acc;
      }
      const float chunk_max = battn_warp_max(s);
      if (chunk_max != BATTN_NEG_INF) {  // TREE: every key of this tile may be another branch's
        float rescale;
        const float p = battn_softmax_step(s, chunk_max, m, l, rescale);
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
          o[i] *= rescale;
        }
        const int n = min(TILE, limit - base);
        for (int t = 0; t < n; ++t) {
          const float pt = __shfl_sync(0xffffffffu, p, t);
#pragma unroll
          for (int i = 0; i < KW / 32; ++i) {
            const float2 vv = battn_unword(vs[t][lane + 32 * i], static_cast<const T*>(nullptr));
            o[i * VW] = fmaf(pt, vv.x, o[i * VW]);
            if (VW == 2) {
              o[i * VW + 1] = fmaf(pt, vv.y, o[i * VW + 1]);
            }
          }
        }
      }
      __syncthreads();  // the next tile overwrites ks and vs
    }
    T* op = out + (((long long)b * L + row) * H + h) * D;
#pragma unroll
    for (int i = 0; i < KW / 32; ++i) {
#pragma unroll
      for (int c = 0; c < VW; ++c) {
        battn_store(op + (lane + 32 * i) * VW + c, o[i * VW + c] / l);
      }
    }
    return;
  }

  const T* vl = vb + lane * VPT * v_strides[3];  // this lane's output dims
  for (int base = first + warp * 32; base < limit; base += WARPS * 32) {
    const int j = base + lane;
    float s = BATTN_NEG_INF;
    if (battn_seen(j, limit, TREE, block_first, row_bits, bits_strides[1])) {
      const T* kj = kb + j * k_strides[2];
      float acc = 0.0f;
#pragma unroll
      for (int d = 0; d < D; d += 2) {
        const float2 t = battn_pair(kj + d * k_strides[3], k_strides[3]);
        acc = fmaf(qv[d], t.x, fmaf(qv[d + 1], t.y, acc));
      }
      s = acc;
    }
    const float chunk_max = battn_warp_max(s);
    if (TREE && chunk_max == BATTN_NEG_INF) {
      continue;  // every key of this chunk is another branch's (warp-uniform: the max is the warp's)
    }
    float rescale;  // the chunk holds a seen key: key `base` < limit, or TREE's check above
    const float p = battn_softmax_step(s, chunk_max, m, l, rescale);
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      o[i] *= rescale;
    }
    const int n = min(32, limit - base);  // warp-uniform
    for (int t = 0; t < n; ++t) {
      const float pt = __shfl_sync(0xffffffffu, p, t);
      const T* vj = vl + (base + t) * v_strides[2];
#pragma unroll
      for (int i = 0; i < VPT; i += 2) {
        const float2 w = battn_pair(vj + i * v_strides[3], v_strides[3]);
        o[i] = fmaf(pt, w.x, o[i]);
        o[i + 1] = fmaf(pt, w.y, o[i + 1]);
      }
    }
  }

  // Merge the warps' softmax states: out = sum_w o_w 2^(m_w - M) / sum_w l_w 2^(m_w - M).
  __shared__ float warp_m[WARPS];
  __shared__ float warp_l[WARPS];
  __shared__ float warp_o[GROUPED ? 1 : WARPS * D];
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
