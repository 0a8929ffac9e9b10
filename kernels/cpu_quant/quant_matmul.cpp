// y = x @ W^T on MLX's CPU backend with W 4- or 8-bit affine (MLX's format, repacked) and x as two int8
// codes per block of 32 (~15 bits; AVX-512 VNNI). Built at the server's first start by
// engine/backend/cpu_quant.py.
//
// Why: MLX 0.32.4 runs small models on the CPU in float32, and a decode step there is mostly the weights'
// stream (the 135M model's 121 products: 36 ms of a 44 ms step on a 2-core Xeon); its bf16, f16 and
// quantized CPU matmuls are 3-8x slower than float32 at one row. Reading 4-bit weights with int8 dot
// products is how llama.cpp decodes the same GGUF at 82 tok/s there (with one int8 code per activation).
//
//   x: (..., K) float32, K % 32 == 0
//   w: G = ceil(N / 16) groups of 16 output rows; for group g, block b (32 inputs), 64-byte lane set i,
//      output j (0..15) and t (0..3):
//      4-bit (G, K / 32, 256) uint8, i 0..3: q[16g + j][32b + 4i + t] | q[16g + j][32b + 16 + 4i + t] << 4
//      8-bit (G, K / 32, 512) uint8, i 0..7: q[16g + j][32b + 4i + t]
//   scales, mins: (G, K / group, 16) float16 or float32: w[n][k] = scale * q + min per group of inputs
//   y: (..., N) float32
// One VNNI instruction multiplies 4 inputs into each of 16 outputs; a block's weights are loaded (and
// unpacked) once for up to ROWS activation rows. Each output is summed in the same order whatever the
// number of rows: a row of a verify equals the same row computed alone, bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <immintrin.h>
#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace mlx::core;

namespace {

constexpr int ROWS = 4;  // activation rows per pass over a group's weights (accumulators in registers)
#ifndef PARALLEL_MACS
#define PARALLEL_MACS (8 << 20)
#endif

// Inputs are taken as they come: a contiguous() node per input cost ~1.5 us of graph work each, 504 of a
// 16-row verify's 2,055 nodes. An input that is not row-major when it runs is copied then.
struct RowMajor {
  Shape shape;
  Strides strides;
  bool dense;
  explicit RowMajor(const array& a) : shape(a.shape()), strides(a.strides()), dense(a.flags().row_contiguous) {}

  // src's elements in row-major order: src itself when it is row-major, else copied into scratch
  const float* read(const float* src, std::vector<float>& scratch) const {
    if (dense) return src;
    size_t n = 1;
    for (int s : shape) n *= size_t(s);
    scratch.resize(n);
    if (n == 0) return scratch.data();
    const int nd = int(shape.size()), last = shape.back();
    const int64_t step = strides.back();
    std::vector<int> at(nd, 0);
    for (size_t r = 0; r < n / last; r++) {
      int64_t offset = 0;
      for (int d = 0; d + 1 < nd; d++) offset += at[d] * strides[d];
      for (int j = 0; j < last; j++) scratch[r * last + j] = src[offset + j * step];
      for (int d = nd - 2; d >= 0; d--) {
        if (++at[d] < shape[d]) break;
        at[d] = 0;
      }
    }
    return scratch.data();
  }
};

// a parameter (evaluated at load, repacked row-major) passes as it is; anything else gets a contiguous() node
array as_loaded(const array& a, const Stream& s) {
  return a.is_available() && a.flags().row_contiguous ? a : contiguous(a, false, s);
}

// out allocated and every array registered with the stream's encoder: what each op's eval_cpu starts with
cpu::CommandEncoder& encoder_for(const Stream& s, const std::vector<array>& inputs, array& out) {
  out.set_data(allocator::malloc(out.nbytes()));
  auto& encoder = cpu::get_command_encoder(s);
  for (const array& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  return encoder;
}

// vmap over rows (the training objective's per-block draft forwards on a kernel draft): rows are independent,
// so a mapped axis other than the last passes through; the last is moved to the front first
std::pair<array, int> rows_mapped(const array& x, int axis, const Stream& s) {
  if (axis == x.ndim() - 1) return {moveaxis(x, axis, 0, s), 0};
  return {x, axis};
}

// x -> two int8 codes per block of 32: x ~ d * (q + r / 254), q = round(x / d), d = amax / 127, and r the
// rounded remainder (|r| <= 127). With one code the int8 rounding (as llama.cpp's) moved the embedded
// 135M model's logits by 8% and its greedy answers with them; the second brings it to ~3e-5 of amax.
// Also each block's exact float sum (the minima's term).
void quantize_rows(const float* x, int M, int K, int8_t* xq, int8_t* xr, float* dx, float* xs) {
  const int nb = K / 32;
  for (int r = 0; r < M; r++) {
    for (int b = 0; b < nb; b++) {
      const size_t at = size_t(r) * K + b * 32;
      const __m512 v0 = _mm512_loadu_ps(x + at), v1 = _mm512_loadu_ps(x + at + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      const __m512 s = _mm512_set1_ps(id), s2 = _mm512_set1_ps(id * 254.f), step = _mm512_set1_ps(d);
      // round to nearest even (the default MXCSR)
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
      const __m512 r0 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q0), step, v0);
      const __m512 r1 = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q1), step, v1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + at), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + at + 16), _mm512_cvtsepi32_epi8(q1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xr + at), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(r0, s2))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xr + at + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(r1, s2))));
      dx[size_t(r) * nb + b] = d;
      xs[size_t(r) * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    }
  }
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int BITS, typename S, int R>
inline void group_rows(const uint8_t* wg, const S* sg, const S* mg, const int8_t* xq, const int8_t* xr, const float* dx,
                       const float* xs, float* y, int K, int N, int shift, int n0) {
  const int nb = K / 32;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const uint8_t* p = wg + size_t(b) * 8 * BITS * 8;  // 256 or 512 bytes a block
    __m512i lo[4], hi[4];  // the products' operands for inputs 4i.. of 0..15 and of 16..31
    for (int i = 0; i < 4; i++) {
      if constexpr (BITS == 4) {
        const __m512i packed = _mm512_loadu_si512(p + 64 * i);
        lo[i] = _mm512_and_si512(packed, low);
        hi[i] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      } else {
        lo[i] = _mm512_loadu_si512(p + 64 * i);
        hi[i] = _mm512_loadu_si512(p + 256 + 64 * i);
      }
    }
    const __m512 sw = load16(sg + size_t(b >> shift) * 16), mw = load16(mg + size_t(b >> shift) * 16);
    for (int r = 0; r < R; r++) {
      const int32_t* xb = reinterpret_cast<const int32_t*>(xq + size_t(r) * K + b * 32);
      const int32_t* rb = reinterpret_cast<const int32_t*>(xr + size_t(r) * K + b * 32);
      // four chains (code and remainder, inputs 0..15 and 16..31): a quarter of the dependent VNNI latency
      __m512i a = _mm512_setzero_si512(), c = a, e = a, f = a;
      for (int i = 0; i < 4; i++) {
        a = _mm512_dpbusd_epi32(a, lo[i], _mm512_set1_epi32(xb[i]));
        c = _mm512_dpbusd_epi32(c, hi[i], _mm512_set1_epi32(xb[4 + i]));
        e = _mm512_dpbusd_epi32(e, lo[i], _mm512_set1_epi32(rb[i]));
        f = _mm512_dpbusd_epi32(f, hi[i], _mm512_set1_epi32(rb[4 + i]));
      }
      const float d = dx[size_t(r) * nb + b];
      // d * (code + remainder / 254), each code's integer sum exact
      const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e, f)), _mm512_set1_ps(1.f / 254.f),
                                         _mm512_cvtepi32_ps(_mm512_add_epi32(a, c)));
      acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(sw, _mm512_set1_ps(d)), acc[r]);
      acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs[size_t(r) * nb + b]), acc[r]);
    }
  }
  const int valid = N - n0 < 16 ? N - n0 : 16;
  const __mmask16 mask = __mmask16((1u << valid) - 1u);
  for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + size_t(r) * N + n0, mask, acc[r]);
}

template <int BITS, typename S>
void matmul_rows(const float* x, const uint8_t* w, const S* scales, const S* mins, float* y, int M, int K,
                    int N, int group) {
  const int nb = K / 32, ng = K / group, G = (N + 15) / 16;
  int shift = 0;
  while ((32 << shift) < group) shift++;
  std::vector<int8_t> xq(size_t(M) * K), xr(size_t(M) * K);
  std::vector<float> dx(size_t(M) * nb), xs(size_t(M) * nb);
  quantize_rows(x, M, K, xq.data(), xr.data(), dx.data(), xs.data());
  // a second thread pays only for large products: waking it (OMP_WAIT_POLICY=PASSIVE) costs more than a
  // decode step's 576 x 3072 product takes on one core (1 row: 10.2 ms for the 135M step alone, 13.0 with two)
  const bool parallel = int64_t(M) * N * K >= PARALLEL_MACS;
#pragma omp parallel for schedule(static) if (parallel)
  for (int g = 0; g < G; g++) {
    const uint8_t* wg = w + size_t(g) * nb * 8 * BITS * 8;
    const S* sg = scales + size_t(g) * ng * 16;
    const S* mg = mins + size_t(g) * ng * 16;
    int r = 0;
    for (; r + ROWS <= M; r += ROWS)
      group_rows<BITS, S, ROWS>(wg, sg, mg, xq.data() + size_t(r) * K, xr.data() + size_t(r) * K, dx.data() + size_t(r) * nb, xs.data() + size_t(r) * nb,
                          y + size_t(r) * N, K, N, shift, g * 16);
    for (; r < M; r++)  // the same per-row arithmetic as inside a pass of ROWS rows
      group_rows<BITS, S, 1>(wg, sg, mg, xq.data() + size_t(r) * K, xr.data() + size_t(r) * K, dx.data() + size_t(r) * nb, xs.data() + size_t(r) * nb,
                       y + size_t(r) * N, K, N, shift, g * 16);
  }
}

template <typename S>
void matmul(int bits, const float* x, const uint8_t* w, const S* scales, const S* mins, float* y, int M, int K, int N,
            int group) {
  if (bits == 4)
    matmul_rows<4>(x, w, scales, mins, y, M, K, N, group);
  else
    matmul_rows<8>(x, w, scales, mins, y, M, K, N, group);
}

array quant_matmul(const array& x, const array& w, const array& scales, const array& mins, int n_out, int group);

class QuantMatmul : public UnaryPrimitive {
 public:
  QuantMatmul(Stream s, int n_out, int group) : UnaryPrimitive(s), n_out_(n_out), group_(group) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array &x = inputs[0], &w = inputs[1], &scales = inputs[2], &mins = inputs[3];
    auto& encoder = encoder_for(stream(), inputs, out);
    const int K = x.shape(-1), M = int(x.size() / K), N = out.shape(-1), group = group_, bits = w.shape(2) / 64;
    const float* xp = x.data<float>();
    const uint8_t* wp = w.data<uint8_t>();
    float* yp = out.data<float>();
    const RowMajor layout(x);
    if (scales.dtype() == float16) {
      const auto* sp = reinterpret_cast<const uint16_t*>(scales.data<float16_t>());
      const auto* mp = reinterpret_cast<const uint16_t*>(mins.data<float16_t>());
      encoder.dispatch([=]() {
        std::vector<float> scratch;
        matmul(bits, layout.read(xp, scratch), wp, sp, mp, yp, M, K, N, group);
      });
    } else {
      const float* sp = scales.data<float>();
      const float* mp = mins.data<float>();
      encoder.dispatch([=]() {
        std::vector<float> scratch;
        matmul(bits, layout.read(xp, scratch), wp, sp, mp, yp, M, K, N, group);
      });
    }
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("quant_matmul runs on the CPU only");
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    for (size_t i = 1; i < axes.size(); i++)
      if (axes[i] >= 0) throw std::invalid_argument("quant_matmul: vmap over the weights is not supported");
    auto [x, axis] = rows_mapped(inputs[0], axes[0], stream());
    return {{quant_matmul(x, inputs[1], inputs[2], inputs[3], n_out_, group_)}, {axis}};
  }
  const char* name() const override { return "DFlashQuantMatmul"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const QuantMatmul&>(other);
    return n_out_ == o.n_out_ && group_ == o.group_;
  }

 private:
  int n_out_;
  int group_;
};

array quant_matmul(const array& x, const array& w, const array& scales, const array& mins, int n_out, int group) {
  const int K = x.ndim() ? x.shape(-1) : 0;
  const int G = (n_out + 15) / 16;
  const bool ok = x.dtype() == float32 && K > 0 && K % 32 == 0 && group >= 32 && group % 32 == 0 && K % group == 0 &&
                  (group & (group - 1)) == 0 && w.dtype() == uint8 && w.ndim() == 3 && w.shape(0) == G &&
                  w.shape(1) == K / 32 && (w.shape(2) == 256 || w.shape(2) == 512) && (scales.dtype() == float16 || scales.dtype() == float32) &&
                  mins.dtype() == scales.dtype() && scales.ndim() == 3 && scales.shape(0) == G &&
                  scales.shape(1) == K / group && scales.shape(2) == 16 && mins.shape() == scales.shape();
  if (!ok)
    throw std::invalid_argument(
        "quant_matmul: x (..., K) float32, K % group == 0; w (ceil(N / 16), K / 32, 256 or 512) uint8; scales and mins "
        "(ceil(N / 16), K / group, 16) float16 or float32; group a power of two >= 32");
  Shape shape = x.shape();
  shape.back() = n_out;
  const Stream s = default_stream(Device::cpu);
  return array(shape, float32, std::make_shared<QuantMatmul>(s, n_out, group),
               {x, as_loaded(w, s), as_loaded(scales, s), as_loaded(mins, s)});
}

// --- attention: softmax(scale q k^T [+ causal]) v over a block of query rows, one pass per row ---
// The CPU twin of the GPU block kernels: MLX's composition (two BLAS products and a softmax, ~10 ops)
// took 0.9 ms for 16 rows over 317 keys, where the arithmetic is 12 MFLOP. Each query row is computed
// alone, in the same order whatever the number of rows, so a verify row equals the decode step's.

// e^x on [-87, 88] (clamped there): 2^(x log2 e) = 2^n 2^f, 2^f by a degree-6 polynomial (~2e-7)
inline __m512 exp_clamped(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

struct AttentionShape {
  int B, H, Hkv, L, S, D;
  int64_t q[3], k[3], v[3];  // element strides of batch, head and row (the last dim is contiguous)
  float scale;
  bool causal;  // the L query rows are the last L positions of the S keys
};

void attention_rows(const float* q, const float* k, const float* v, float* out, const AttentionShape& a) {
  const int group = a.H / a.Hkv, chunks = a.D / 16;
  // a decode step's few thousand scores take ~20 us alone, less than waking a sleeping OpenMP thread
  const bool parallel = int64_t(a.B) * a.H * a.L * a.S >= 32768;
#pragma omp parallel if (parallel)
  {
    std::vector<float> scores(a.S);
    std::vector<__m512> acc(chunks);
#pragma omp for collapse(2) schedule(static)
    for (int bh = 0; bh < a.B * a.H; bh++) {
      for (int row = 0; row < a.L; row++) {
        const int b = bh / a.H, h = bh % a.H, kvh = h / group;
        const float* qr = q + b * a.q[0] + h * a.q[1] + row * a.q[2];
        const float* kb = k + b * a.k[0] + kvh * a.k[1];
        const float* vb = v + b * a.v[0] + kvh * a.v[1];
        const int keys = a.causal ? a.S - a.L + row + 1 : a.S;
        float top = -INFINITY;
        for (int j = 0; j < keys; j++) {
          const float* kj = kb + j * a.k[2];
          __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qr), _mm512_loadu_ps(kj));
          for (int c = 1; c < chunks; c++)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), _mm512_loadu_ps(kj + 16 * c), dot);
          scores[j] = _mm512_reduce_add_ps(dot) * a.scale;
          top = std::fmax(top, scores[j]);
        }
        __m512 total = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= keys; j += 16) {
          const __m512 e = exp_clamped(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + j), _mm512_set1_ps(top)));
          _mm512_storeu_ps(scores.data() + j, e);
          total = _mm512_add_ps(total, e);
        }
        if (j < keys) {
          const __mmask16 tail = __mmask16((1u << (keys - j)) - 1u);
          const __m512 e = exp_clamped(
              _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores.data() + j), _mm512_set1_ps(top)));
          _mm512_mask_storeu_ps(scores.data() + j, tail, e);
          total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
        }
        for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
        for (int jj = 0; jj < keys; jj++) {
          const __m512 w = _mm512_set1_ps(scores[jj]);
          const float* vj = vb + jj * a.v[2];
          for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vj + 16 * c), acc[c]);
        }
        const __m512 inverse = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
        float* o = out + ((size_t(b) * a.H + h) * a.L + row) * a.D;
        for (int c = 0; c < chunks; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], inverse));
      }
    }
  }
}

// the element stride of dim i of a row-major copy of a
int64_t row_major_stride(const array& a, int i) {
  int64_t stride = 1;
  for (int d = a.ndim() - 1; d > i; d--) stride *= a.shape(d);
  return stride;
}

class BlockAttention : public UnaryPrimitive {
 public:
  BlockAttention(Stream s, float scale, bool causal) : UnaryPrimitive(s), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    auto& encoder = encoder_for(stream(), inputs, out);
    AttentionShape a{int(q.shape(0)), int(q.shape(1)), int(k.shape(1)), int(q.shape(2)), int(k.shape(2)),
                     int(q.shape(3)), {}, {}, {}, scale_, causal_};
    // strided views (a KV cache's prefix) are read in place; only a last dim that is not contiguous is copied
    const RowMajor lq(q), lk(k), lv(v);
    const bool copy_q = q.strides().back() != 1, copy_k = k.strides().back() != 1, copy_v = v.strides().back() != 1;
    for (int i = 0; i < 3; i++) {
      a.q[i] = copy_q ? row_major_stride(q, i) : q.strides()[i];
      a.k[i] = copy_k ? row_major_stride(k, i) : k.strides()[i];
      a.v[i] = copy_v ? row_major_stride(v, i) : v.strides()[i];
    }
    encoder.dispatch([qp = q.data<float>(), kp = k.data<float>(), vp = v.data<float>(), op = out.data<float>(), a, lq,
                      lk, lv, copy_q, copy_k, copy_v]() {
      std::vector<float> sq, sk, sv;
      attention_rows(copy_q ? lq.read(qp, sq) : qp, copy_k ? lk.read(kp, sk) : kp, copy_v ? lv.read(vp, sv) : vp, op,
                     a);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("block_attention runs on the CPU only");
  }
  const char* name() const override { return "DFlashBlockAttention"; }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const BlockAttention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  bool causal_;
};

array block_attention(const array& q, const array& k, const array& v, float scale, bool causal) {
  const bool ok = q.ndim() == 4 && k.ndim() == 4 && v.shape() == k.shape() && q.dtype() == float32 &&
                  k.dtype() == float32 && v.dtype() == float32 && q.shape(0) == k.shape(0) && q.shape(3) == k.shape(3) &&
                  q.shape(3) % 16 == 0 && k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0 &&
                  (!causal || q.shape(2) <= k.shape(2)) && k.shape(2) > 0;
  if (!ok)
    throw std::invalid_argument(
        "block_attention: q (B, H, L, D), k and v (B, Hkv, S, D) float32, H % Hkv == 0, D % 16 == 0, S > 0 "
        "(S >= L when causal)");
  const Stream s = default_stream(Device::cpu);
  return array(q.shape(), float32, std::make_shared<BlockAttention>(s, scale, causal),
               {q, k, v});
}

// --- the probability of each row's most likely entry: 1 / sum(exp(x - max)) ---
// How sure the draft is of each greedy proposal, read by the adaptive verify width every drafting cycle:
// MLX's CPU exp took 3.3 ms over 15 rows of a 16,384-token proposal head, this ~0.05.
class TopProbability : public UnaryPrimitive {
 public:
  explicit TopProbability(Stream s) : UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    auto& encoder = encoder_for(stream(), inputs, out);
    const int V = x.shape(-1), M = int(x.size() / V);
    encoder.dispatch([source = x.data<float>(), layout = RowMajor(x), op = out.data<float>(), M, V]() {
      std::vector<float> scratch;
      const float* xp = layout.read(source, scratch);
      for (int m = 0; m < M; m++) {
        const float* row = xp + size_t(m) * V;
        __m512 high = _mm512_set1_ps(-INFINITY);
        int j = 0;
        for (; j + 16 <= V; j += 16) high = _mm512_max_ps(high, _mm512_loadu_ps(row + j));
        float top = _mm512_reduce_max_ps(high);
        for (; j < V; j++) top = std::fmax(top, row[j]);
        if (!std::isfinite(top)) {  // all -inf (or a NaN): no distribution to be sure of
          op[m] = std::isnan(top) ? top : 0.f;
          continue;
        }
        __m512 total = _mm512_setzero_ps();
        const __m512 shift = _mm512_set1_ps(top);
        for (j = 0; j + 16 <= V; j += 16)
          total = _mm512_add_ps(total, exp_clamped(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift)));
        float sum = _mm512_reduce_add_ps(total);
        for (; j < V; j++) sum += std::exp(row[j] - top);
        op[m] = 1.f / sum;
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("top_probability runs on the CPU only");
  }
  const char* name() const override { return "DFlashTopProbability"; }
  bool is_equivalent(const Primitive&) const override { return true; }
};

array top_probability(const array& x) {
  if (x.dtype() != float32 || x.ndim() < 1 || x.shape(-1) < 1)
    throw std::invalid_argument("top_probability: x (..., V) float32, V >= 1");
  Shape shape = x.shape();
  shape.pop_back();
  const Stream s = default_stream(Device::cpu);
  return array(shape, float32, std::make_shared<TopProbability>(s), {x});
}

// --- SwiGLU: silu(gate) * up = gate * up / (1 + e^-gate), from a packed [gate | up] product ---
// MLX's composition (a scalar exp per element, or engine/backend/fast_exp.py's compiled polynomial, ~14
// graph nodes) took ~0.25 ms for a 16-row block's 24,576 values: 14% of the 135M model's 16-row verify.
// Each value is computed alone, so a verify row equals the decode step's, bit for bit.
array swiglu(const array& gate_up, int hidden);

class Swiglu : public UnaryPrimitive {
 public:
  Swiglu(Stream s, int hidden) : UnaryPrimitive(s), hidden_(hidden) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    auto& encoder = encoder_for(stream(), inputs, out);
    const int I = hidden_, M = int(out.size() / I);
    encoder.dispatch([source = x.data<float>(), layout = RowMajor(x), op = out.data<float>(), M, I]() {
      std::vector<float> scratch;
      const float* xp = layout.read(source, scratch);
      // a prefill chunk's values are worth a second thread; a block's are not (see PARALLEL_MACS)
#pragma omp parallel for schedule(static) if (int64_t(M) * I >= (1 << 18))
      for (int r = 0; r < M; r++) {
        const float* g = xp + size_t(r) * 2 * I;
        const float* u = g + I;
        float* y = op + size_t(r) * I;
        for (int j = 0; j < I; j += 16) {
          const __mmask16 m = I - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (I - j)) - 1u);
          const __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, u + j);
          const __m512 e = exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), gv));
          _mm512_mask_storeu_ps(y + j, m, _mm512_div_ps(_mm512_mul_ps(gv, uv), _mm512_add_ps(_mm512_set1_ps(1.f), e)));
        }
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("swiglu runs on the CPU only");
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    auto [x, axis] = rows_mapped(inputs[0], axes[0], stream());
    return {{swiglu(x, hidden_)}, {axis}};
  }
  const char* name() const override { return "DFlashSwiglu"; }
  bool is_equivalent(const Primitive& other) const override {
    return hidden_ == static_cast<const Swiglu&>(other).hidden_;
  }

 private:
  int hidden_;
};

array swiglu(const array& gate_up, int hidden) {
  if (gate_up.dtype() != float32 || gate_up.ndim() < 1 || hidden < 1 || gate_up.shape(-1) != 2 * hidden)
    throw std::invalid_argument("swiglu: gate_up (..., 2 * hidden) float32, hidden >= 1");
  Shape shape = gate_up.shape();
  shape.back() = hidden;
  const Stream s = default_stream(Device::cpu);
  return array(shape, float32, std::make_shared<Swiglu>(s, hidden), {gate_up});
}

// --- RMSNorm: w * x / sqrt(mean(x^2) + eps) per row, one node ---
// engine/model/compiled_norm.py's compiled formula is three graph nodes (square, sum, one fused kernel)
// at ~5 us each on this backend, 61 norms a step of the 135M model. Each row alone, as above.
array rms_norm(const array& x, const array& weight, float eps);

class RmsNorm : public UnaryPrimitive {
 public:
  RmsNorm(Stream s, float eps) : UnaryPrimitive(s), eps_(eps) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array &x = inputs[0], &w = inputs[1];
    auto& encoder = encoder_for(stream(), inputs, out);
    const int D = x.shape(-1), M = int(x.size() / D);
    encoder.dispatch([source = x.data<float>(), layout = RowMajor(x), wp = w.data<float>(), op = out.data<float>(), M,
                      D, eps = eps_]() {
      std::vector<float> scratch;
      const float* xp = layout.read(source, scratch);
#pragma omp parallel for schedule(static) if (int64_t(M) * D >= (1 << 18))
      for (int r = 0; r < M; r++) {
        const float* row = xp + size_t(r) * D;
        float* y = op + size_t(r) * D;
        __m512 squares = _mm512_setzero_ps();
        for (int j = 0; j < D; j += 16) {
          const __mmask16 m = D - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - j)) - 1u);
          const __m512 v = _mm512_maskz_loadu_ps(m, row + j);
          squares = _mm512_fmadd_ps(v, v, squares);
        }
        const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / float(D) + eps));
        for (int j = 0; j < D; j += 16) {
          const __mmask16 m = D - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - j)) - 1u);
          const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), scale);
          _mm512_mask_storeu_ps(y + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, wp + j), v));
        }
      }
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("rms_norm runs on the CPU only");
  }
  std::pair<std::vector<array>, std::vector<int>> vmap(const std::vector<array>& inputs,
                                                       const std::vector<int>& axes) override {
    if (axes.size() > 1 && axes[1] >= 0) throw std::invalid_argument("rms_norm: vmap over the weight is not supported");
    auto [x, axis] = rows_mapped(inputs[0], axes[0], stream());
    return {{rms_norm(x, inputs[1], eps_)}, {axis}};
  }
  const char* name() const override { return "DFlashRmsNorm"; }
  bool is_equivalent(const Primitive& other) const override { return eps_ == static_cast<const RmsNorm&>(other).eps_; }

 private:
  float eps_;
};

array rms_norm(const array& x, const array& weight, float eps) {
  if (x.dtype() != float32 || weight.dtype() != float32 || x.ndim() < 1 || weight.ndim() != 1 ||
      weight.shape(0) != x.shape(-1) || x.shape(-1) < 1)
    throw std::invalid_argument("rms_norm: x (..., D) and weight (D,) float32, D >= 1");
  const Stream s = default_stream(Device::cpu);
  return array(x.shape(), float32, std::make_shared<RmsNorm>(s, eps), {x, as_loaded(weight, s)});
}

}  // namespace

NB_MODULE(_cpu_quant, m) {
  m.def("quant_matmul", &quant_matmul, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("mins"),
        nb::arg("n_out"), nb::arg("group"),
        "x (..., K) float32 @ repacked 4- or 8-bit W (N, K) ^T -> (..., N) float32, on the CPU");
  m.def("block_attention", &block_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        nb::arg("causal"), "softmax(scale q k^T, causal: the rows are the last of the keys) v, on the CPU");
  m.def("swiglu", &swiglu, nb::arg("gate_up"), nb::arg("hidden"),
        "gate_up (..., 2 * hidden) float32 -> (..., hidden) silu(gate) * up, on the CPU");
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "x (..., D) float32 -> weight * x / sqrt(mean(x^2) + eps) per row, on the CPU");
  m.def("top_probability", &top_probability, nb::arg("x"),
        "x (..., V) float32 -> (...,) the softmax probability of each row's largest entry, on the CPU");
}
