// CPU AdamW: step scalars, the scalar loop, ISA dispatch and the multithreaded driver.
#include "offload/cpu_adamw.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "offload/internal/adamw_kernels.h"

namespace tandem::offload {

namespace internal {

void AdamWScalar(const AdamWScalars& s, float* master, float* m, float* v, Bf16* w,
                 const float* grad, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * s.grad_scale;
    float p = master[i] * s.decay;
    const float mi = m[i] + s.one_minus_beta1 * (g - m[i]);
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * g * g;
    const float denom = std::sqrt(vi) / s.bias2_sqrt + s.eps;
    p = p - s.step_size * (mi / denom);
    master[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (w != nullptr) w[i] = FloatToBf16(p);
  }
}

}  // namespace internal

const char* SimdLevelName(SimdLevel level) {
  switch (level) {
    case SimdLevel::kScalar:
      return "scalar";
    case SimdLevel::kAvx2:
      return "avx2";
    case SimdLevel::kAvx512:
      return "avx512";
  }
  return "?";
}

bool CpuSupports(SimdLevel level) {
#if defined(__x86_64__)
  switch (level) {
    case SimdLevel::kScalar:
      return true;
    case SimdLevel::kAvx2:
      return __builtin_cpu_supports("avx2");
    case SimdLevel::kAvx512:
      return __builtin_cpu_supports("avx512f");
  }
  return false;
#else
  return level == SimdLevel::kScalar;
#endif
}

SimdLevel BestSimdLevel() {
  if (CpuSupports(SimdLevel::kAvx512)) return SimdLevel::kAvx512;
  if (CpuSupports(SimdLevel::kAvx2)) return SimdLevel::kAvx2;
  return SimdLevel::kScalar;
}

AdamWScalars MakeAdamWScalars(const ops::AdamWParams& p) {
  // The same expressions as ops/cpu/adamw.cc: f64 step scalars rounded once to f32.
  const double bias1 = 1.0 - std::pow(static_cast<double>(p.beta1), static_cast<double>(p.step));
  const double bias2 = 1.0 - std::pow(static_cast<double>(p.beta2), static_cast<double>(p.step));
  AdamWScalars s;
  s.beta1 = p.beta1;
  s.beta2 = p.beta2;
  s.one_minus_beta1 = 1.0f - p.beta1;
  s.one_minus_beta2 = 1.0f - p.beta2;
  s.eps = p.eps;
  s.grad_scale = p.grad_scale;
  s.step_size = static_cast<float>(static_cast<double>(p.lr) / bias1);
  s.bias2_sqrt = static_cast<float>(std::sqrt(bias2));
  s.decay = static_cast<float>(1.0 - static_cast<double>(p.lr) * p.weight_decay);
  return s;
}

void CpuAdamWRange(const AdamWScalars& s, float* master, float* m, float* v, Bf16* weights_bf16,
                   const float* grad, int64_t n, SimdLevel level) {
  TANDEM_CHECK_MSG(CpuSupports(level), "this CPU does not run ", SimdLevelName(level));
  switch (level) {
    case SimdLevel::kAvx512:
      internal::AdamWAvx512(s, master, m, v, weights_bf16, grad, n);
      return;
    case SimdLevel::kAvx2:
      internal::AdamWAvx2(s, master, m, v, weights_bf16, grad, n);
      return;
    case SimdLevel::kScalar:
      internal::AdamWScalar(s, master, m, v, weights_bf16, grad, n);
      return;
  }
}

namespace {
Status ExpectHostF32(const Tensor& t, int64_t n, const char* name) {
  if (!t.defined() || !t.device().is_cpu() || t.dtype() != DType::kF32 || !t.is_contiguous() ||
      t.numel() != n) {
    return InvalidArgumentError(StrCat("CpuAdamW: tensor '", name,
                                       "': expected contiguous host f32 [", n, "], found ",
                                       t.defined() ? t.DebugString() : "undefined"));
  }
  return Status::Ok();
}
}  // namespace

Status CpuAdamW(Tensor& master, Tensor& m, Tensor& v, Tensor& weights_bf16, const Tensor& grad,
                const ops::AdamWParams& params, const CpuAdamWOptions& options) {
  const int64_t n = master.defined() ? master.numel() : 0;
  TANDEM_RETURN_IF_ERROR(ExpectHostF32(master, n, "master"));
  TANDEM_RETURN_IF_ERROR(ExpectHostF32(m, n, "m"));
  TANDEM_RETURN_IF_ERROR(ExpectHostF32(v, n, "v"));
  TANDEM_RETURN_IF_ERROR(ExpectHostF32(grad, n, "grad"));
  Bf16* w = nullptr;
  if (weights_bf16.defined()) {
    if (!weights_bf16.device().is_cpu() || weights_bf16.dtype() != DType::kBF16 ||
        !weights_bf16.is_contiguous() || weights_bf16.numel() != n) {
      return InvalidArgumentError(StrCat("CpuAdamW: tensor 'weights_bf16': expected contiguous ",
                                         "host bf16 [", n, "], found ",
                                         weights_bf16.DebugString()));
    }
    w = weights_bf16.data<Bf16>();
  }
  const SimdLevel level = options.simd.value_or(BestSimdLevel());
  if (!CpuSupports(level)) {
    return InvalidArgumentError(StrCat("CpuAdamW: SIMD level ", SimdLevelName(level),
                                       " requested, this CPU does not run it"));
  }
  if (options.chunk_elems < 1) {
    return InvalidArgumentError(
        StrCat("CpuAdamW: chunk_elems must be >= 1, found ", options.chunk_elems));
  }
  const AdamWScalars s = MakeAdamWScalars(params);
  const int64_t chunk = options.chunk_elems;
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  float* pm = master.data<float>();
  float* pmo = m.data<float>();
  float* pv = v.data<float>();
  const float* pg = grad.data<float>();
  const int threads = options.num_threads > 0 ? options.num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) \
    num_threads(threads) if (threads > 1 && num_chunks > 1)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t b = c * chunk;
    const int64_t len = std::min(chunk, n - b);
    CpuAdamWRange(s, pm + b, pmo + b, pv + b, w == nullptr ? nullptr : w + b, pg + b, len, level);
  }
  return Status::Ok();
}

}  // namespace tandem::offload
