// CPU reference of the vocabulary-sharded cross-entropy (ops::ShardedCrossEntropy*): f32 exp, f64
// sums, rows in parallel.
#include <algorithm>
#include <cmath>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {

// logsumexp of the `ranks` (max, sum) partials of row n, combined in rank order.
double CombinedLse(const float* all_partials, int64_t ranks, int64_t rows, int64_t n) {
  float max_all = -INFINITY;
  for (int64_t r = 0; r < ranks; ++r) max_all = std::max(max_all, all_partials[(r * rows + n) * 3]);
  double sum = 0.0;
  for (int64_t r = 0; r < ranks; ++r) {
    const float* p = all_partials + (r * rows + n) * 3;
    if (p[0] != -INFINITY) sum += static_cast<double>(p[1]) * std::exp(p[0] - max_all);
  }
  return static_cast<double>(max_all) + std::log(sum);
}

}  // namespace

void ShardedCrossEntropyPartials(float* partials, const float* logits, const int32_t* targets,
                                 int64_t rows, int64_t cols, int64_t vocab_start, int64_t valid,
                                 int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 15))
  for (int64_t n = 0; n < rows; ++n) {
    const float* x = logits + n * cols;
    float* p = partials + n * 3;
    const float max_x = valid > 0 ? *std::max_element(x, x + valid) : -INFINITY;
    double sum = 0.0;
    if (max_x != -INFINITY) {
      for (int64_t j = 0; j < valid; ++j) sum += std::exp(x[j] - max_x);
    }
    const int64_t t = static_cast<int64_t>(targets[n]) - vocab_start;
    const bool mine = targets[n] != ignore_index && t >= 0 && t < valid;
    p[0] = max_x;
    p[1] = static_cast<float>(sum);
    p[2] = mine ? x[t] : 0.0f;
  }
}

void ShardedCrossEntropyFinish(float* losses, float* dlogits, const float* logits,
                               const float* all_partials, int64_t ranks, const int32_t* targets,
                               int64_t rows, int64_t cols, int64_t vocab_start, int64_t valid,
                               float grad_scale, int32_t ignore_index) {
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 15))
  for (int64_t n = 0; n < rows; ++n) {
    const float* x = logits + n * cols;
    float* dx = dlogits == nullptr ? nullptr : dlogits + n * cols;  // may be x
    if (targets[n] == ignore_index) {
      losses[n] = 0.0f;
      if (dx != nullptr) std::fill(dx, dx + cols, 0.0f);
      continue;
    }
    const double lse = CombinedLse(all_partials, ranks, rows, n);
    double target_logit = 0.0;
    for (int64_t r = 0; r < ranks; ++r) target_logit += all_partials[(r * rows + n) * 3 + 2];
    losses[n] = static_cast<float>(lse - target_logit);
    if (dx == nullptr) continue;
    const float lse_f = static_cast<float>(lse);
    const int64_t t = static_cast<int64_t>(targets[n]) - vocab_start;
    for (int64_t j = 0; j < cols; ++j) {  // element j is read before it is written (dx == x)
      if (j >= valid) {
        dx[j] = 0.0f;
        continue;
      }
      const float prob = std::exp(x[j] - lse_f);
      dx[j] = grad_scale * (j == t ? prob - 1.0f : prob);
    }
  }
}

}  // namespace tandem::ops::cpu
