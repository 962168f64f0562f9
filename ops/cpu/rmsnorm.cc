// CPU RMSNorm forward and backward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {

// 1 / sqrt(mean(x^2) + eps): the mean of squares summed in f64, the rest in f32.
float RowRstd(const float* x, int64_t cols, float eps) {
  double sum_sq = 0.0;
  for (int64_t c = 0; c < cols; ++c) sum_sq += static_cast<double>(x[c]) * x[c];
  const float mean_sq = static_cast<float>(sum_sq / static_cast<double>(cols));
  return 1.0f / std::sqrt(mean_sq + eps);
}

constexpr int64_t kParallelMinElems = 1 << 14;

}  // namespace

void RmsNormForward(float* y, int64_t y_stride, float* rstd, const float* x, int64_t x_stride,
                    const float* w, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float* xr = x + n * x_stride;
    float* yr = y + n * y_stride;
    const float r = RowRstd(xr, cols, eps);
    for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] * r * w[c];
    if (rstd != nullptr) rstd[n] = r;
  }
}

void RmsNormBackward(float* dx, int64_t dx_stride, float* dw, const float* dy, int64_t dy_stride,
                     const float* x, int64_t x_stride, const float* w, const float* rstd,
                     int64_t rows, int64_t cols, bool accumulate_dx) {
  // y = x * r * w with r = (mean(x^2) + eps)^-1/2, so
  // dx = r * w * dy - x * r^3 / C * sum_c(dy * w * x).
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float* xr = x + n * x_stride;
    const float* dyr = dy + n * dy_stride;
    float* dxr = dx + n * dx_stride;
    const float r = rstd[n];
    double dot = 0.0;
    for (int64_t c = 0; c < cols; ++c) dot += static_cast<double>(dyr[c]) * w[c] * xr[c];
    const float coef = static_cast<float>(dot / static_cast<double>(cols)) * r * r * r;
    for (int64_t c = 0; c < cols; ++c) {
      const float g = r * w[c] * dyr[c] - coef * xr[c];
      dxr[c] = accumulate_dx ? dxr[c] + g : g;
    }
  }
  if (dw == nullptr) return;
  // dw[c] += sum_n dy * x * r: columns are split among threads in fixed blocks, each summed over
  // n in order (f64), so the result does not depend on the thread count.
  constexpr int64_t kBlock = 64;
  const int64_t num_blocks = (cols + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinElems)
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(cols, c0 + kBlock);
    double acc[kBlock] = {};
    for (int64_t n = 0; n < rows; ++n) {
      const float* xr = x + n * x_stride;
      const float* dyr = dy + n * dy_stride;
      const float r = rstd[n];
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(dyr[c] * xr[c] * r);
    }
    for (int64_t c = c0; c < c1; ++c) dw[c] += static_cast<float>(acc[c - c0]);
  }
}

}  // namespace tandem::ops::cpu
