// Rows of logits for ops::ArgmaxRows tests (tests/ops/sampling_test.cc, sampling_gpu_test.cc):
// random values plus the edge cases the serving engine relies on, and an independent reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/sampling.h"
#include "tests/common/testing.h"

namespace tandem::ops {

// f32 [rows, cols] host logits, random in [-4, 4), with these rows rewritten:
//   0: a tie for the maximum at two columns (the lower must win);
//   1: a larger value past `valid` (must be ignored);
//   2: a NaN; 3: +inf; 4: every valid value -inf (all three: kArgmaxInvalidRow);
//   5: -inf everywhere but one column; 6: the maximum in the last valid column.
// Needs rows >= 7, valid >= 4, cols > valid.
inline Tensor MakeArgmaxRows(uint64_t seed, int64_t rows, int64_t cols, int64_t valid) {
  Tensor t = testing::RandomUniform({rows, cols}, seed, -4.0f, 4.0f);
  float* x = t.data<float>();
  auto row = [&](int64_t r) { return x + r * cols; };
  row(0)[valid / 3] = 9.0f;
  row(0)[valid / 2] = 9.0f;
  row(1)[valid] = 100.0f;
  row(2)[valid / 2] = NAN;
  row(3)[1] = INFINITY;
  std::fill(row(4), row(4) + valid, -INFINITY);
  std::fill(row(5), row(5) + valid, -INFINITY);
  row(5)[valid - 2] = -1.0f;
  row(6)[valid - 1] = 50.0f;
  return t;
}

// The reference: std::max_element (first maximum) over the valid columns, after the checks.
inline std::vector<int32_t> ReferenceArgmax(const Tensor& logits, int64_t valid) {
  const int64_t rows = logits.dim(0), cols = logits.dim(1);
  std::vector<int32_t> ids(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = logits.data<float>() + r * cols;
    bool bad = std::all_of(x, x + valid, [](float v) { return v == -INFINITY; });
    for (int64_t i = 0; i < valid; ++i) bad = bad || std::isnan(x[i]) || x[i] == INFINITY;
    ids[r] = bad ? kArgmaxInvalidRow : static_cast<int32_t>(std::max_element(x, x + valid) - x);
  }
  return ids;
}

}  // namespace tandem::ops
