// Inputs for the AdamWBf16Multi tests (adamw_bf16_test.cc on the CPU, adamw_bf16_gpu_test.cc
// against it on a GPU): tensors of odd sizes, some views one element into their buffer, f32 and
// bf16 parameters, bf16 moments, f32 gradients.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "ops/context.h"
#include "ops/multi_tensor.h"
#include "tests/common/testing.h"

namespace tandem::ops::testing {

struct Bf16StateCase {
  std::vector<Tensor> param, m, v, grad;
  std::vector<float> decay;
  std::vector<uint64_t> key;
};

// Host tensor of n (+1 when misaligned) values uniform in [lo, hi) in `dtype` on ctx's device,
// returned as the view of its last n elements.
inline Tensor PutRandom(Context& ctx, int64_t n, bool misaligned, uint64_t seed, DType dtype,
                        float lo, float hi) {
  const int64_t off = misaligned ? 1 : 0;
  Tensor host = ::tandem::testing::RandomUniform({n + off}, seed, lo, hi);
  if (dtype == DType::kBF16) {
    Tensor b = Tensor::Cpu({n + off}, DType::kBF16);
    for (int64_t i = 0; i < n + off; ++i) b.data<Bf16>()[i] = FloatToBf16(host.data<float>()[i]);
    host = b;
  }
  Tensor dev = host;
  if (!ctx.device().is_cpu()) dev = std::move(CopyToDeviceBlocking(host, ctx.allocator())).value();
  return dev.Slice(0, off, n + off);
}

// `count` entries; entry i has 1 + (i * 7919) % 5003 elements (300001 for every 17th), every
// remainder mod 4 and 8, a view one element in for i % 5 == 2, bf16 parameters for odd i.
inline Bf16StateCase MakeBf16StateCase(Context& ctx, int count, int64_t step) {
  Bf16StateCase c;
  for (int i = 0; i < count; ++i) {
    const int64_t n = i % 17 == 3 ? 300001 : 1 + (i * 7919) % 5003;
    const bool mis = i % 5 == 2;
    const uint64_t seed = 900 + 10 * static_cast<uint64_t>(i);
    c.param.push_back(PutRandom(ctx, n, mis, seed, i % 2 == 1 ? DType::kBF16 : DType::kF32, -1, 1));
    c.m.push_back(PutRandom(ctx, n, mis, seed + 1, DType::kBF16, -0.1f, 0.1f));
    c.v.push_back(PutRandom(ctx, n, mis, seed + 2, DType::kBF16, 0.0f, 0.01f));
    c.grad.push_back(PutRandom(ctx, n, mis, seed + 3, DType::kF32, -1, 1));
    c.decay.push_back(i % 3 == 0 ? 0.1f : 0.0f);
    c.key.push_back(AdamWNoiseKey(1234, step, static_cast<uint64_t>(i)));
  }
  return c;
}

inline AdamWParams Bf16StateParams(int64_t step) {
  AdamWParams p;
  p.lr = 3e-3f;
  p.step = step;
  p.grad_scale = 0.5f;
  return p;
}

inline Status RunBf16State(Context& ctx, Bf16StateCase& c, const AdamWParams& p) {
  std::vector<AdamWBf16Tensors> entries;
  for (size_t i = 0; i < c.param.size(); ++i) {
    entries.push_back({&c.param[i], &c.m[i], &c.v[i], &c.grad[i], c.decay[i], c.key[i]});
  }
  return AdamWBf16Multi(ctx, entries, p);
}

// A host copy of t widened to f32 (contiguous).
inline Tensor HostF32(const Tensor& t) {
  Tensor h = t.device().is_cpu() ? t : std::move(CopyToHostBlocking(t)).value();
  Tensor out = Tensor::Cpu({h.numel()}, DType::kF32);
  for (int64_t i = 0; i < h.numel(); ++i) {
    out.data<float>()[i] =
        h.dtype() == DType::kF32 ? h.data<float>()[i] : Bf16ToFloat(h.data<Bf16>()[i]);
  }
  return out;
}

}  // namespace tandem::ops::testing
