// Helpers shared by tandem's tests: random tensors, element-wise comparison with per-dtype
// tolerances, GPU skipping, temporary directories.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace tandem::testing {

// Skips the current test (GTEST_SKIP) with a clear message when no CUDA device is usable.
#define TANDEM_SKIP_WITHOUT_GPU()                                                     \
  do {                                                                                \
    if (!::tandem::CudaAvailable()) {                                                 \
      GTEST_SKIP() << (::tandem::BuiltWithCuda()                                      \
                           ? "no CUDA device visible: GPU test skipped"               \
                           : "built without CUDA: GPU test skipped");                 \
    }                                                                                 \
  } while (0)

// Host f32 tensor with values uniform in [lo, hi), from a deterministic generator seeded by `seed`.
Tensor RandomUniform(const Shape& shape, uint64_t seed, float lo = -1.0f, float hi = 1.0f);
// Host i32 tensor with values uniform in [0, bound).
Tensor RandomInts(const Shape& shape, uint64_t seed, int32_t bound);

struct Tolerance {
  double abs;
  double rel;
};
// Every element must satisfy |a - e| <= abs + rel * |e|. On failure, reports the count of bad
// elements and the worst one with its index. `actual` and `expected` are host tensors of any
// floating dtype and the same shape (compared in f64).
::testing::AssertionResult AllClose(const Tensor& actual, const Tensor& expected, Tolerance tol);
// max |a - e| / max(|e|) over all elements: a scale-free relative error for whole tensors.
double MaxRelativeError(const Tensor& actual, const Tensor& expected);

// Fresh empty directory under the system temp dir, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Root of the source tree (for fixtures), from the TANDEM_SOURCE_DIR the build sets.
std::string SourceDir();

}  // namespace tandem::testing
