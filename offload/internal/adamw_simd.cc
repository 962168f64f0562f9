// AVX2 and AVX-512 AdamW. Only IEEE-exact lane operations (add, sub, mul, div, sqrt) in the
// scalar reference's order; FMA is never enabled for these functions, so the compiler cannot
// contract a multiply and an add into one differently rounded instruction.
// GCC 12 warns about its own AVX-512 intrinsics (_mm512_undefined_* in set1/cvtepi32):
// -Wmaybe-uninitialized is a false positive there.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// avx512f implies FMA in GCC, and the default -ffp-contract=fast would then fuse a*b+c: forbid it.
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>

#include "offload/internal/adamw_kernels.h"

namespace tandem::offload::internal {

__attribute__((target("avx2"))) void AdamWAvx2(const AdamWScalars& s, float* master, float* m,
                                               float* v, Bf16* w, const float* grad, int64_t n) {
  const __m256 beta2 = _mm256_set1_ps(s.beta2);
  const __m256 omb1 = _mm256_set1_ps(s.one_minus_beta1);
  const __m256 omb2 = _mm256_set1_ps(s.one_minus_beta2);
  const __m256 eps = _mm256_set1_ps(s.eps);
  const __m256 grad_scale = _mm256_set1_ps(s.grad_scale);
  const __m256 step_size = _mm256_set1_ps(s.step_size);
  const __m256 bias2_sqrt = _mm256_set1_ps(s.bias2_sqrt);
  const __m256 decay = _mm256_set1_ps(s.decay);
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf_bits = _mm256_set1_epi32(0x7f800000);
  const __m256i round_bias = _mm256_set1_epi32(0x7fff);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(grad + i), grad_scale);
    __m256 p = _mm256_mul_ps(_mm256_loadu_ps(master + i), decay);
    const __m256 m0 = _mm256_loadu_ps(m + i);
    const __m256 mi = _mm256_add_ps(m0, _mm256_mul_ps(omb1, _mm256_sub_ps(g, m0)));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), beta2),
                                    _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bias2_sqrt), eps);
    p = _mm256_sub_ps(p, _mm256_mul_ps(step_size, _mm256_div_ps(mi, denom)));
    _mm256_storeu_ps(master + i, p);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    if (w != nullptr) {
      const __m256i u = _mm256_castps_si256(p);
      const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf_bits);
      const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      const __m256i rounded =
          _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, round_bias), lsb), 16);
      const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
      const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);
      const __m128i packed =
          _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w + i), packed);
    }
  }
  if (i < n) {
    AdamWScalar(s, master + i, m + i, v + i, w == nullptr ? nullptr : w + i, grad + i, n - i);
  }
}

__attribute__((target("avx512f"))) void AdamWAvx512(const AdamWScalars& s, float* master, float* m,
                                                    float* v, Bf16* w, const float* grad,
                                                    int64_t n) {
  const __m512 beta2 = _mm512_set1_ps(s.beta2);
  const __m512 omb1 = _mm512_set1_ps(s.one_minus_beta1);
  const __m512 omb2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(s.eps);
  const __m512 grad_scale = _mm512_set1_ps(s.grad_scale);
  const __m512 step_size = _mm512_set1_ps(s.step_size);
  const __m512 bias2_sqrt = _mm512_set1_ps(s.bias2_sqrt);
  const __m512 decay = _mm512_set1_ps(s.decay);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf_bits = _mm512_set1_epi32(0x7f800000);
  const __m512i round_bias = _mm512_set1_epi32(0x7fff);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), grad_scale);
    __m512 p = _mm512_mul_ps(_mm512_loadu_ps(master + i), decay);
    const __m512 m0 = _mm512_loadu_ps(m + i);
    const __m512 mi = _mm512_add_ps(m0, _mm512_mul_ps(omb1, _mm512_sub_ps(g, m0)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), beta2),
                                    _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bias2_sqrt), eps);
    p = _mm512_sub_ps(p, _mm512_mul_ps(step_size, _mm512_div_ps(mi, denom)));
    _mm512_storeu_ps(master + i, p);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    if (w != nullptr) {
      const __m512i u = _mm512_castps_si512(p);
      const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf_bits);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      const __m512i rounded =
          _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, round_bias), lsb), 16);
      const __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet);
      const __m512i r = _mm512_mask_blend_epi32(is_nan, rounded, nan);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + i), _mm512_cvtepi32_epi16(r));
    }
  }
  if (i < n) {
    AdamWScalar(s, master + i, m + i, v + i, w == nullptr ? nullptr : w + i, grad + i, n - i);
  }
}

}  // namespace tandem::offload::internal
