// y = x @ W^T on MLX's CPU backend with W in Q4_1 blocks and x rounded to int8 per block of 32 (AVX-512 VNNI).
//
// Why: MLX 0.32.4 runs small models on the CPU in float32, and a decode step there is mostly the weights'
// stream (the 135M model's 121 products: 36 ms of a 44 ms step on a 2-core Xeon); its bf16, f16 and
// quantized CPU matmuls are 3-8x slower than float32 at one row. Reading 4-bit blocks (0.1 GB instead of
// 0.54) with int8 dot products is how llama.cpp decodes the same GGUF at 82 tok/s there.
//
//   x: (..., K) float32, K % 64 == 0;  w: (N, K / 32 * 24) uint8, each block {float d, m; uint8 qs[16]}
//   holding w[k] = d * q[k] + m, q[k] in 0..15, k 0..15 in the low nibbles and 16..31 in the high ones
//   (the GGUF's Q4_1 layout with float32 scales).  y: (..., N) float32.
// Each row is computed in the same order whatever the number of rows, so a verify row equals the same
// row decoded alone, bit for bit (speculative greedy decoding stays exact against plain decoding).
#include <cmath>
#include <cstdint>
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

struct BlockQ4 {
  float d, m;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ4) == 24, "a Q4_1 block with float32 scales is 24 bytes");

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

void q4_matmul_rows(const float* x, const BlockQ4* w, float* y, int M, int K, int N) {
  const int nb = K / 32;
  // x ~ dx * xq per block; xs = dx * sum(xq) carries the blocks' minimum term (m * sum x)
  std::vector<int8_t> xq(size_t(M) * K);
  std::vector<float> dx(size_t(M) * nb), xs(size_t(M) * nb);
  for (int r = 0; r < M; r++) {
    for (int b = 0; b < nb; b++) {
      const float* v = x + size_t(r) * K + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; i++) amax = std::fmax(amax, std::fabs(v[i]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int i = 0; i < 32; i++) {
        const int q = int(std::lrint(v[i] * id));
        xq[size_t(r) * K + b * 32 + i] = int8_t(q);
        sum += q;
      }
      dx[size_t(r) * nb + b] = d;
      xs[size_t(r) * nb + b] = d * float(sum);
    }
  }
  const __m128i low = _mm_set1_epi8(15);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const BlockQ4* wn = w + size_t(n) * nb;
    for (int r = 0; r < M; r++) {
      const int8_t* xr = xq.data() + size_t(r) * K;
      const float* dr = dx.data() + size_t(r) * nb;
      const float* sr = xs.data() + size_t(r) * nb;
      // two independent chains: one accumulator waited on the previous block's FMA
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      float m0 = 0.f, m1 = 0.f;
      for (int b = 0; b < nb; b += 2) {
        const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn[b].qs));
        const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn[b + 1].qs));
        const __m256i w0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v0, 4), low), _mm_and_si128(v0, low));
        const __m256i w1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v1, 4), low), _mm_and_si128(v1, low));
        const __m256i d0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w0,
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * 32)));
        const __m256i d1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w1,
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + b * 32 + 32)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_set1_ps(wn[b].d * dr[b]), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_set1_ps(wn[b + 1].d * dr[b + 1]), a1);
        m0 += wn[b].m * sr[b];
        m1 += wn[b + 1].m * sr[b + 1];
      }
      y[size_t(r) * N + n] = hsum(_mm256_add_ps(a0, a1)) + (m0 + m1);
    }
  }
}

class Q4Matmul : public UnaryPrimitive {
 public:
  explicit Q4Matmul(Stream s) : UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    const array& w = inputs[1];
    out.set_data(allocator::malloc(out.nbytes()));
    auto& encoder = cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    const int K = x.shape(-1), M = int(x.size() / K), N = out.shape(-1);
    encoder.dispatch([xp = x.data<float>(), wp = reinterpret_cast<const BlockQ4*>(w.data<uint8_t>()),
                      yp = out.data<float>(), M, K, N]() { q4_matmul_rows(xp, wp, yp, M, K, N); });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("q4_matmul runs on the CPU only");
  }
  const char* name() const override { return "DFlashQ4Matmul"; }
};

array q4_matmul(const array& x, const array& w) {
  const int K = x.ndim() ? x.shape(-1) : 0;
  if (x.dtype() != float32 || w.dtype() != uint8 || w.ndim() != 2 || K % 64 != 0 || w.shape(1) != K / 32 * 24)
    throw std::invalid_argument("q4_matmul: x (..., K) float32 with K % 64 == 0, w (N, K / 32 * 24) uint8");
  Shape shape = x.shape();
  shape.back() = w.shape(0);
  const Stream s = default_stream(Device::cpu);
  return array(shape, float32, std::make_shared<Q4Matmul>(s), {contiguous(x, false, s), contiguous(w, false, s)});
}

}  // namespace

NB_MODULE(_cpu_q4, m) {
  m.def("q4_matmul", &q4_matmul, nb::arg("x"), nb::arg("w"),
        "x (..., K) float32 @ Q4_1 blocks w (N, K / 32 * 24) uint8 ^T -> (..., N) float32, on the CPU");
}
