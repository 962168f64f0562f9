// CPU AdamW over f32 master weights and moments with bf16 weight output: the host side of the
// offloaded optimizer.
//
// The math is ops::AdamW's, operation for operation and in f32 (see ops/ops.h), so results are
// bitwise equal to ops::AdamW on a CPU context for the same inputs (tested): per-step scalars are
// computed in f64 and rounded once, exactly as ops/cpu/adamw.cc does; per element
//   g = grad * grad_scale;  p = master * decay;  m = m + (1 - beta1) * (g - m);
//   v = v * beta2 + (1 - beta2) * g * g;  denom = sqrt(v) / sqrt(1 - beta2^step) + eps;
//   p = p - step_size * (m / denom);  weights = bf16(p) (round to nearest even, NaN kept).
// The AVX2 and AVX-512 paths use the same IEEE operations lane by lane (no fused multiply-add,
// which would round differently), are compiled with __attribute__((target)) and chosen at run time
// with __builtin_cpu_supports; a scalar loop handles the tail.
//
//   CpuAdamW(master, m, v, weights_bf16, grad, params, {.num_threads = 8});
//
// Thread-safety: functions are pure over their arguments; ranges given to concurrent calls must
// not overlap.
#pragma once

#include <cstdint>
#include <optional>

#include "core/dtype.h"
#include "core/tensor.h"
#include "ops/ops.h"

namespace tandem::offload {

enum class SimdLevel : uint8_t { kScalar, kAvx2, kAvx512 };

// "scalar", "avx2", "avx512".
const char* SimdLevelName(SimdLevel level);
// The widest level this CPU runs.
SimdLevel BestSimdLevel();
bool CpuSupports(SimdLevel level);

// The per-step constants of one update, computed as ops::AdamW computes them.
struct AdamWScalars {
  float beta1 = 0, beta2 = 0;
  float one_minus_beta1 = 0, one_minus_beta2 = 0;  // 1.0f - beta, in f32
  float eps = 0, grad_scale = 1;
  float step_size = 0;   // f32(lr / (1 - beta1^step)), the quotient in f64
  float bias2_sqrt = 0;  // f32(sqrt(1 - beta2^step)), in f64
  float decay = 1;       // f32(1 - lr * weight_decay), in f64
};
AdamWScalars MakeAdamWScalars(const ops::AdamWParams& params);

// One update of n contiguous elements on the calling thread. weights_bf16 may be nullptr.
// Precondition (checked): CpuSupports(level).
void CpuAdamWRange(const AdamWScalars& scalars, float* master, float* m, float* v,
                   Bf16* weights_bf16, const float* grad, int64_t n, SimdLevel level);

struct CpuAdamWOptions {
  int num_threads = 0;                     // OpenMP threads; 0 = OpenMP's default
  int64_t chunk_elems = int64_t{1} << 16;  // elements per work item
  std::optional<SimdLevel> simd;           // default: BestSimdLevel()
};

// master, m, v, grad: host f32 [n] contiguous; weights_bf16: host bf16 [n] or undefined.
// InvalidArgument (naming the tensor) for wrong devices, dtypes, sizes or an unsupported level.
Status CpuAdamW(Tensor& master, Tensor& m, Tensor& v, Tensor& weights_bf16, const Tensor& grad,
                const ops::AdamWParams& params, const CpuAdamWOptions& options = {});

}  // namespace tandem::offload
