// Helpers shared by the ops tests: a CPU context, weighted-sum losses and central finite
// differences.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "ops/context.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::ops::testing {

using ::tandem::testing::AllClose;
using ::tandem::testing::RandomInts;
using ::tandem::testing::RandomUniform;
using ::tandem::testing::Tolerance;

// sum_i out[i] * weights[i] over contiguous f32 host tensors, in f64: the scalar loss whose
// gradient with respect to out is `weights`.
inline double WeightedSum(const Tensor& out, const Tensor& weights) {
  TANDEM_CHECK(out.shape() == weights.shape() && out.is_contiguous() && weights.is_contiguous());
  const float* o = out.data<float>();
  const float* w = weights.data<float>();
  double sum = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) sum += static_cast<double>(o[i]) * w[i];
  return sum;
}

// Gradient of loss() with respect to every element of the contiguous f32 host tensor `x`, by
// central differences: (L(x + h) - L(x - h)) / (x+h - (x-h)), with x +- h rounded to f32 first.
inline Tensor NumericGradient(const std::function<double()>& loss, Tensor& x, float h) {
  TANDEM_CHECK(x.is_contiguous() && x.dtype() == DType::kF32);
  Tensor grad = Tensor::Cpu(x.shape(), DType::kF32);
  float* p = x.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float saved = p[i];
    const float up = saved + h, down = saved - h;
    p[i] = up;
    const double l_up = loss();
    p[i] = down;
    const double l_down = loss();
    p[i] = saved;
    grad.data<float>()[i] = static_cast<float>((l_up - l_down) / (static_cast<double>(up) - down));
  }
  return grad;
}

// A contiguous copy of a host tensor or strided view.
inline Tensor Clone(const Tensor& t) {
  Tensor out = Tensor::Cpu(t.shape(), t.dtype());
  const size_t elem = DTypeSize(t.dtype());
  const char* src = static_cast<const char*>(t.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  std::vector<int64_t> index(t.ndim(), 0);
  for (int64_t n = 0; n < t.numel(); ++n) {
    int64_t offset = 0;
    for (int d = 0; d < t.ndim(); ++d) offset += index[d] * t.stride(d);
    std::memcpy(dst + n * elem, src + offset * static_cast<int64_t>(elem), elem);
    for (int d = t.ndim() - 1; d >= 0 && ++index[d] == t.dim(d); --d) index[d] = 0;
  }
  return out;
}

// True when two host tensors hold the same bytes.
inline bool BitwiseEqual(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw_data(), b.raw_data(), a.num_bytes()) == 0;
}

// Llama's inverse frequencies for head dim D: theta^(-2i/D).
inline Tensor InvFreq(int64_t head_dim, double theta = 10000.0) {
  Tensor t = Tensor::Cpu({head_dim / 2}, DType::kF32);
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    t.data<float>()[i] = static_cast<float>(std::pow(theta, -2.0 * i / head_dim));
  }
  return t;
}

}  // namespace tandem::ops::testing
