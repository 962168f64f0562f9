// CPU elementwise ops and the sum of squares.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {

constexpr int64_t kParallelMinElems = 1 << 16;

inline float LoadFloat(DType dtype, const void* p, int64_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const Bf16*>(p)[i]);
    case DType::kF16:
      return F16ToFloat(static_cast<const F16*>(p)[i]);
    default:
      return 0.0f;  // callers pass floating dtypes only
  }
}

inline void StoreFloat(DType dtype, void* p, int64_t i, float value) {
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(p)[i] = value;
      break;
    case DType::kBF16:
      static_cast<Bf16*>(p)[i] = FloatToBf16(value);
      break;
    case DType::kF16:
      static_cast<F16*>(p)[i] = FloatToF16(value);
      break;
    default:
      break;
  }
}

// value truncated toward zero, saturated to I's range; NaN gives 0.
template <typename I>
I SaturateToInt(float value) {
  if (std::isnan(value)) return 0;
  const double v = std::trunc(static_cast<double>(value));
  if (v <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (v >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(v);
}

}  // namespace

void SumSquares(float* out, DType dtype, const void* x, int64_t n) {
  // Fixed-size blocks summed in f64, then the block sums in order: the same result for any number
  // of threads.
  constexpr int64_t kBlock = 1 << 14;
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(num_blocks, 0.0);
#pragma omp parallel for schedule(static) if (n > kParallelMinElems)
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    double acc = 0.0;
    const int64_t end = std::min(n, (blk + 1) * kBlock);
    for (int64_t i = blk * kBlock; i < end; ++i) {
      const double xi = LoadFloat(dtype, x, i);
      acc += xi * xi;
    }
    partial[blk] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  out[0] += static_cast<float>(total);
}

void Add(DType dtype, void* out, const void* a, const void* b, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinElems)
  for (int64_t i = 0; i < n; ++i) {
    StoreFloat(dtype, out, i, LoadFloat(dtype, a, i) + LoadFloat(dtype, b, i));
  }
}

void Cast(DType out_dtype, void* out, DType in_dtype, const void* in, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinElems)
  for (int64_t i = 0; i < n; ++i) StoreFloat(out_dtype, out, i, LoadFloat(in_dtype, in, i));
}

void Scale(DType dtype, void* x, float s, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMinElems)
  for (int64_t i = 0; i < n; ++i) StoreFloat(dtype, x, i, LoadFloat(dtype, x, i) * s);
}

void Fill(DType dtype, void* out, float value, int64_t n) {
  switch (dtype) {
    case DType::kI32:
      std::fill_n(static_cast<int32_t*>(out), n, SaturateToInt<int32_t>(value));
      break;
    case DType::kI64:
      std::fill_n(static_cast<int64_t*>(out), n, SaturateToInt<int64_t>(value));
      break;
    case DType::kU8:
      std::fill_n(static_cast<uint8_t*>(out), n, SaturateToInt<uint8_t>(value));
      break;
    case DType::kF32:
      std::fill_n(static_cast<float*>(out), n, value);
      break;
    case DType::kBF16:
      std::fill_n(static_cast<Bf16*>(out), n, FloatToBf16(value));
      break;
    case DType::kF16:
      std::fill_n(static_cast<F16*>(out), n, FloatToF16(value));
      break;
  }
}

}  // namespace tandem::ops::cpu
