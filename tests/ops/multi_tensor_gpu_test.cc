// ops/multi_tensor.h: AdamWMulti and SumSquaresMulti give the bits of the single-tensor ops
// called once per tensor in list order, on the CPU and on a GPU (where they are one or a few
// launches over up to 150 tensors of odd sizes, misaligned views and mixed dtypes), and the GPU
// results match the CPU reference. Bad entries are refused naming the entry.
#include <gtest/gtest.h>

#include <vector>

#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "tests/common/testing.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

// Sizes with every remainder mod 4 and 8, tiny and large, and views that start one element
// into a buffer (not 16-byte aligned: the scalar paths).
struct Sizes {
  std::vector<int64_t> n;
  std::vector<bool> misaligned;
};

Sizes MakeSizes(int count) {
  Sizes s;
  for (int i = 0; i < count; ++i) {
    const int64_t n = i % 17 == 3 ? 300001 : 1 + (i * 7919) % 5003;
    s.n.push_back(n);
    s.misaligned.push_back(i % 5 == 2);
  }
  return s;
}

// A host random tensor of n elements in `dtype` as a view into a buffer on ctx's device (offset
// by one element when misaligned).
Tensor Put(Context& ctx, int64_t n, bool misaligned, uint64_t seed, DType dtype, float lo = -1.0f,
           float hi = 1.0f) {
  const int64_t off = misaligned ? 1 : 0;
  Tensor host = testing::RandomUniform({n + off}, seed, lo, hi);
  if (dtype != DType::kF32) {
    auto ctx_cpu = Context::Cpu();
    Tensor cast = Tensor::Cpu({n + off}, dtype);
    TANDEM_CHECK_OK(Cast(*ctx_cpu, cast, host));
    host = cast;
  }
  Tensor dev = host;
  if (!ctx.device().is_cpu()) dev = std::move(CopyToDeviceBlocking(host, ctx.allocator())).value();
  return dev.Slice(0, off, n + off);
}

Tensor Host(const Tensor& t) {
  Tensor c = t.device().is_cpu() ? t : std::move(CopyToHostBlocking(t)).value();
  return testing::Clone(c);
}

struct OptimizerState {
  std::vector<Tensor> master, m, v, weights, grad;
  std::vector<float> decay;
};

OptimizerState MakeState(Context& ctx, const Sizes& s) {
  OptimizerState st;
  for (size_t i = 0; i < s.n.size(); ++i) {
    const int64_t n = s.n[i];
    const bool mis = s.misaligned[i];
    const uint64_t seed = 100 + 10 * i;
    st.master.push_back(Put(ctx, n, mis, seed, DType::kF32));
    st.m.push_back(Put(ctx, n, mis, seed + 1, DType::kF32, -0.1f, 0.1f));
    st.v.push_back(Put(ctx, n, mis, seed + 2, DType::kF32, 0.0f, 0.01f));
    st.grad.push_back(Put(ctx, n, mis, seed + 3, DType::kF32));
    // Model weights: none, bf16 or f32 (ignored on the CPU, which rounds like the GPU).
    const int kind = static_cast<int>(i % 3);
    st.weights.push_back(
        kind == 0 ? Tensor() : Put(ctx, n, mis, seed + 4, kind == 1 ? DType::kBF16 : DType::kF32));
    st.decay.push_back(i % 2 == 0 ? 0.1f : 0.0f);
  }
  return st;
}

AdamWParams Params() {
  AdamWParams p;
  p.lr = 3e-3f;
  p.step = 7;
  p.grad_scale = 0.5f;
  return p;
}

void RunSingle(Context& ctx, OptimizerState& st) {
  for (size_t i = 0; i < st.master.size(); ++i) {
    AdamWParams p = Params();
    p.weight_decay = st.decay[i];
    ASSERT_TRUE(AdamW(ctx, st.master[i], st.m[i], st.v[i], st.weights[i], st.grad[i], p).ok());
  }
}

void RunMulti(Context& ctx, OptimizerState& st) {
  std::vector<AdamWTensors> entries;
  for (size_t i = 0; i < st.master.size(); ++i) {
    entries.push_back(
        {&st.master[i], &st.m[i], &st.v[i], &st.weights[i], &st.grad[i], st.decay[i]});
  }
  ASSERT_TRUE(AdamWMulti(ctx, entries, Params()).ok());
}

void ExpectSameBits(const OptimizerState& a, const OptimizerState& b) {
  for (size_t i = 0; i < a.master.size(); ++i) {
    EXPECT_TRUE(testing::BitwiseEqual(Host(a.master[i]), Host(b.master[i]))) << "master " << i;
    EXPECT_TRUE(testing::BitwiseEqual(Host(a.m[i]), Host(b.m[i]))) << "m " << i;
    EXPECT_TRUE(testing::BitwiseEqual(Host(a.v[i]), Host(b.v[i]))) << "v " << i;
    if (a.weights[i].defined()) {
      EXPECT_TRUE(testing::BitwiseEqual(Host(a.weights[i]), Host(b.weights[i]))) << "weights " << i;
    }
  }
}

void CheckAdamWMultiIsSingle(Context& ctx) {
  const Sizes sizes = MakeSizes(150);
  OptimizerState single = MakeState(ctx, sizes), multi = MakeState(ctx, sizes);
  RunSingle(ctx, single);
  RunMulti(ctx, multi);
  ASSERT_TRUE(ctx.Synchronize().ok());
  ExpectSameBits(single, multi);
}

// Gradients of mixed dtypes (runs of f32, then bf16, then f32 again) and sizes.
std::vector<Tensor> MakeGrads(Context& ctx, int count) {
  const Sizes s = MakeSizes(count);
  std::vector<Tensor> xs;
  for (int i = 0; i < count; ++i) {
    const DType dt = (i / 40) % 2 == 1 ? DType::kBF16 : DType::kF32;
    xs.push_back(Put(ctx, s.n[i], s.misaligned[i], 500 + i, dt));
  }
  xs.push_back(Put(ctx, 0, false, 1, DType::kF32));  // an empty tensor adds nothing
  return xs;
}

Tensor SumSquaresOf(Context& ctx, const std::vector<Tensor>& xs, bool multi) {
  Tensor out = Put(ctx, 1, false, 7, DType::kF32, 1.0f, 2.0f);  // accumulates onto a value
  if (multi) {
    EXPECT_TRUE(SumSquaresMulti(ctx, out, xs).ok());
  } else {
    for (const Tensor& x : xs) EXPECT_TRUE(SumSquares(ctx, out, x).ok());
  }
  return Host(out);
}

TEST(MultiTensorTest, CpuMultiIsSingle) {
  auto ctx = Context::Cpu();
  CheckAdamWMultiIsSingle(*ctx);
  const std::vector<Tensor> xs = MakeGrads(*ctx, 150);
  EXPECT_TRUE(testing::BitwiseEqual(SumSquaresOf(*ctx, xs, true), SumSquaresOf(*ctx, xs, false)));
}

TEST(MultiTensorTest, BadEntriesNameTheEntry) {
  auto ctx = Context::Cpu();
  Tensor a = Tensor::CpuZeros({4}, DType::kF32), b = Tensor::CpuZeros({4}, DType::kF32);
  Tensor c = Tensor::CpuZeros({4}, DType::kF32), short_grad = Tensor::CpuZeros({3}, DType::kF32);
  Tensor g = Tensor::CpuZeros({4}, DType::kF32);
  std::vector<AdamWTensors> entries = {{&a, &b, &c, nullptr, &g, 0.0f},
                                       {&a, &b, &c, nullptr, &short_grad, 0.0f}};
  const Status s = AdamWMulti(*ctx, entries, Params());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("entry 1"), std::string::npos) << s.ToString();
  EXPECT_NE(s.ToString().find("grad"), std::string::npos) << s.ToString();
  entries[1].grad = nullptr;
  EXPECT_NE(AdamWMulti(*ctx, entries, Params()).ToString().find("entry 1"), std::string::npos);
  Tensor out = Tensor::CpuZeros({1}, DType::kF32);
  const std::vector<Tensor> xs = {g, Tensor::CpuZeros({2}, DType::kI32)};
  const Status q = SumSquaresMulti(*ctx, out, xs);
  EXPECT_EQ(q.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(q.ToString().find("xs[1]"), std::string::npos) << q.ToString();
}

TEST(MultiTensorGpuTest, MultiIsSingleAndMatchesTheCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(Context::Cuda(0)).value();
  CheckAdamWMultiIsSingle(*ctx);
  const std::vector<Tensor> xs = MakeGrads(*ctx, 150);
  const Tensor multi = SumSquaresOf(*ctx, xs, true);
  EXPECT_TRUE(testing::BitwiseEqual(multi, SumSquaresOf(*ctx, xs, false)));

  // Against the CPU reference (f64 blocks there: equal to rounding).
  auto cpu = Context::Cpu();
  std::vector<Tensor> xs_cpu;
  for (const Tensor& x : xs) xs_cpu.push_back(Host(x));
  const Tensor ref = SumSquaresOf(*cpu, xs_cpu, true);
  EXPECT_NEAR(multi.data<float>()[0], ref.data<float>()[0], 1e-5 * ref.data<float>()[0]);
  const Sizes sizes = MakeSizes(150);
  OptimizerState gpu = MakeState(*ctx, sizes), host = MakeState(*cpu, sizes);
  RunMulti(*ctx, gpu);
  RunMulti(*cpu, host);
  ASSERT_TRUE(ctx->Synchronize().ok());
  for (size_t i = 0; i < sizes.n.size(); ++i) {
    const Tensor a = Host(gpu.master[i]), b = Host(host.master[i]);
    for (int64_t k = 0; k < a.numel(); ++k) {
      ASSERT_NEAR(a.data<float>()[k], b.data<float>()[k],
                  1e-6 + 1e-5 * std::abs(b.data<float>()[k]))
          << "master of entry " << i << " element " << k;
    }
  }
}

}  // namespace
}  // namespace tandem::ops
