#include "collectives/internal/host_reduce.h"

#include <algorithm>
#include <type_traits>

#include "core/status.h"

namespace tandem::collectives::internal {
namespace {

template <typename T>
T Combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      if constexpr (std::is_integral_v<T>) {
        using U = std::make_unsigned_t<T>;  // wrap around instead of signed overflow
        return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
      } else {
        return a + b;
      }
    case ReduceOp::kMax:
      return std::max(a, b);
    case ReduceOp::kMin:
      return std::min(a, b);
  }
  return a;
}

// Elements processed per block: ranks are combined block by block so the partial sums stay in
// cache while every input is streamed once.
constexpr int64_t kBlock = 2048;

template <typename T>
void ReduceTyped(T* out, const std::vector<const void*>& ins, int64_t n, ReduceOp op) {
  T acc[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    const T* x0 = static_cast<const T*>(ins[0]) + b;
    std::copy(x0, x0 + m, acc);
    for (size_t r = 1; r < ins.size(); ++r) {
      const T* x = static_cast<const T*>(ins[r]) + b;
      for (int64_t i = 0; i < m; ++i) acc[i] = Combine(acc[i], x[i], op);
    }
    if constexpr (std::is_floating_point_v<T>) {
      if (op == ReduceOp::kAvg) {
        const T count = static_cast<T>(ins.size());
        for (int64_t i = 0; i < m; ++i) acc[i] /= count;
      }
    }
    std::copy(acc, acc + m, out + b);
  }
}

// bf16/f16: widen each input block to f32, combine in f32, round once.
void ReduceHalf(void* out, const std::vector<const void*>& ins, int64_t n, DType dtype,
                ReduceOp op) {
  float acc[kBlock];
  float x[kBlock];
  const size_t elem = DTypeSize(dtype);
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    WidenToF32(acc, static_cast<const char*>(ins[0]) + b * elem, dtype, m);
    for (size_t r = 1; r < ins.size(); ++r) {
      WidenToF32(x, static_cast<const char*>(ins[r]) + b * elem, dtype, m);
      for (int64_t i = 0; i < m; ++i) acc[i] = Combine(acc[i], x[i], op);
    }
    if (op == ReduceOp::kAvg) DivideF32(acc, m, static_cast<float>(ins.size()));
    NarrowFromF32(static_cast<char*>(out) + b * elem, acc, dtype, m);
  }
}

}  // namespace

void ReduceInOrder(void* out, const std::vector<const void*>& ins, int64_t n, DType dtype,
                   ReduceOp op) {
  TANDEM_CHECK(!ins.empty());
  switch (dtype) {
    case DType::kF32:
      return ReduceTyped(static_cast<float*>(out), ins, n, op);
    case DType::kI32:
      return ReduceTyped(static_cast<int32_t*>(out), ins, n, op);
    case DType::kI64:
      return ReduceTyped(static_cast<int64_t*>(out), ins, n, op);
    case DType::kU8:
      return ReduceTyped(static_cast<uint8_t*>(out), ins, n, op);
    case DType::kBF16:
    case DType::kF16:
      return ReduceHalf(out, ins, n, dtype, op);
  }
}

void WidenToF32(float* dst, const void* src, DType dtype, int64_t n) {
  if (dtype == DType::kBF16) {
    const Bf16* s = static_cast<const Bf16*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(s[i]);
  } else {
    TANDEM_CHECK(dtype == DType::kF16);
    const F16* s = static_cast<const F16*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = F16ToFloat(s[i]);
  }
}

void NarrowFromF32(void* dst, const float* src, DType dtype, int64_t n) {
  if (dtype == DType::kBF16) {
    Bf16* d = static_cast<Bf16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = FloatToBf16(src[i]);
  } else {
    TANDEM_CHECK(dtype == DType::kF16);
    F16* d = static_cast<F16*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = FloatToF16(src[i]);
  }
}

void DivideF32(float* x, int64_t n, float divisor) {
  for (int64_t i = 0; i < n; ++i) x[i] /= divisor;
}

}  // namespace tandem::collectives::internal
