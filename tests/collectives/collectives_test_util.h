// Helpers for the collectives tests: each rank's random input (any rank can rebuild any other
// rank's input from the seed, so every rank checks the whole result), and plain references.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "collectives/communicator.h"
#include "core/tensor.h"
#include "tests/common/testing.h"

namespace tandem::collectives::testing {

// Element i of `rank`'s input for a test case, from a counter-based hash (SplitMix64), so any
// slice of any rank's input can be rebuilt without generating the rest.
inline uint64_t Mix(uint64_t seed, int rank, int64_t i) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(rank) * 0xbf58476d1ce4e5b9ull +
               static_cast<uint64_t>(i) * 0x94d049bb133111ebull + 0x2545f4914f6cdd1dull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Elements [offset, offset + n) of `rank`'s input: f32/bf16/f16 uniform in [-1, 1) (bf16/f16
// rounded), i32/i64 in [-1000, 1000), u8 in [0, 256). Never all zeros.
inline Tensor RankInput(DType dtype, int64_t n, uint64_t seed, int rank, int64_t offset = 0) {
  Tensor out = Tensor::Cpu({n}, dtype);
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t h = Mix(seed, rank, offset + k);
    const float f = static_cast<float>(h >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f;
    const int32_t v = static_cast<int32_t>(h % 2000) - 1000;
    switch (dtype) {
      case DType::kF32:
        out.data<float>()[k] = f;
        break;
      case DType::kBF16:
        out.data<Bf16>()[k] = FloatToBf16(f);
        break;
      case DType::kF16:
        out.data<F16>()[k] = FloatToF16(f);
        break;
      case DType::kI32:
        out.data<int32_t>()[k] = v;
        break;
      case DType::kI64:
        out.data<int64_t>()[k] = v;
        break;
      case DType::kU8:
        out.data<uint8_t>()[k] = static_cast<uint8_t>(h & 0xff);
        break;
    }
  }
  return out;
}

inline double Load(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::kF32:
      return t.data<float>()[i];
    case DType::kBF16:
      return Bf16ToFloat(t.data<Bf16>()[i]);
    case DType::kF16:
      return F16ToFloat(t.data<F16>()[i]);
    case DType::kI32:
      return t.data<int32_t>()[i];
    case DType::kI64:
      return static_cast<double>(t.data<int64_t>()[i]);
    case DType::kU8:
      return t.data<uint8_t>()[i];
  }
  return 0;
}

// Exact reduction in f64 over `inputs` (elements [offset, offset + n)), as f64 values.
inline std::vector<double> ReferenceReduce(const std::vector<Tensor>& inputs, int64_t offset,
                                           int64_t n, ReduceOp op) {
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) {
    double acc = Load(inputs[0], offset + i);
    for (size_t r = 1; r < inputs.size(); ++r) {
      const double x = Load(inputs[r], offset + i);
      acc = op == ReduceOp::kMax   ? std::max(acc, x)
            : op == ReduceOp::kMin ? std::min(acc, x)
                                   : acc + x;
    }
    if (op == ReduceOp::kAvg) acc /= static_cast<double>(inputs.size());
    if (inputs[0].dtype() == DType::kU8) acc = std::fmod(acc, 256.0);  // sums wrap around
    out[i] = acc;
  }
  return out;
}

// Stated tolerances for a reduction over `ranks` ranks of inputs in [-1, 1): f32 accumulates
// rounding of at most (ranks - 1) additions; bf16/f16 results are rounded once from an f32 sum
// whose order may differ from the reference, so they may land one unit in the last place away
// (2^-7 relative for bf16, 2^-10 for f16). Integers: exact.
inline ::tandem::testing::Tolerance ReduceTolerance(DType dtype, int ranks) {
  switch (dtype) {
    case DType::kF32:
      return {2e-7 * ranks, 2e-7 * ranks};
    case DType::kBF16:
      return {1e-6, 1.0 / 128};
    case DType::kF16:
      return {1e-6, 1.0 / 1024};
    default:
      return {0, 0};
  }
}

// Every element of `actual` (a host tensor) within `tol` of `expected`.
inline ::testing::AssertionResult MatchesValues(const Tensor& actual,
                                                const std::vector<double>& expected,
                                                ::tandem::testing::Tolerance tol) {
  if (actual.numel() != static_cast<int64_t>(expected.size())) {
    return ::testing::AssertionFailure() << "numel " << actual.numel() << " vs " << expected.size();
  }
  int64_t bad = 0, worst = -1;
  double worst_err = 0;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    const double err = std::fabs(Load(actual, i) - expected[i]);
    if (!(err <= tol.abs + tol.rel * std::fabs(expected[i]))) {
      if (bad++ == 0 || err > worst_err) worst = i, worst_err = err;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << actual.numel() << " elements off; worst at " << worst << ": "
         << Load(actual, worst) << " vs expected " << expected[worst];
}

// Bytes of two host tensors equal.
inline bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.num_bytes() == b.num_bytes() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

inline double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline const std::vector<DType>& MainDTypes() {
  static const std::vector<DType> kTypes = {DType::kF32, DType::kBF16, DType::kI32};
  return kTypes;
}
inline const std::vector<int64_t>& OddSizes() {
  static const std::vector<int64_t> kSizes = {1, 3, 1000003};
  return kSizes;
}

}  // namespace tandem::collectives::testing
