// CPU SwiGLU: out = silu(gate) * up.
#include <cmath>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {
constexpr int64_t kParallelMinElems = 1 << 15;
inline float Sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }
}  // namespace

void SwigluForward(float* out, int64_t out_stride, const float* gate, int64_t gate_stride,
                   const float* up, int64_t up_stride, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float* g = gate + n * gate_stride;
    const float* u = up + n * up_stride;
    float* o = out + n * out_stride;
    for (int64_t c = 0; c < cols; ++c) o[c] = g[c] / (1.0f + std::exp(-g[c])) * u[c];
  }
}

void SwigluBackward(float* dgate, int64_t dgate_stride, float* dup, int64_t dup_stride,
                    const float* dout, int64_t dout_stride, const float* gate, int64_t gate_stride,
                    const float* up, int64_t up_stride, int64_t rows, int64_t cols) {
  // d silu(g) / dg = s * (1 + g * (1 - s)) with s = sigmoid(g).
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float* g = gate + n * gate_stride;
    const float* u = up + n * up_stride;
    const float* d = dout + n * dout_stride;
    float* dg = dgate + n * dgate_stride;
    float* du = dup + n * dup_stride;
    for (int64_t c = 0; c < cols; ++c) {
      const float gc = g[c], uc = u[c], dc = d[c];  // read all before writing (aliasing)
      const float s = Sigmoid(gc);
      du[c] = dc * gc * s;
      dg[c] = dc * uc * s * (1.0f + gc * (1.0f - s));
    }
  }
}

}  // namespace tandem::ops::cpu
