// CPU AdamW: every SIMD level this CPU runs gives bits equal to ops::AdamW on a CPU context
// (master, m, v and bf16 weights), across sizes with vector tails, weight decay on and off,
// gradient scaling, several steps, and NaN/inf inputs; the multithreaded tensor API equally.
#include "offload/cpu_adamw.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/context.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::offload {
namespace {

using tandem::testing::RandomUniform;

Tensor Clone(const Tensor& t) {
  Tensor c = Tensor::Cpu(t.shape(), t.dtype());
  std::memcpy(c.raw_data(), t.raw_data(), t.num_bytes());
  return c;
}

// Every element's bits equal (NaN payloads included).
::testing::AssertionResult BitsEqual(const Tensor& a, const Tensor& b, const char* what) {
  if (a.num_bytes() != b.num_bytes()) return ::testing::AssertionFailure() << what << ": sizes";
  const size_t elem = DTypeSize(a.dtype());
  const auto* pa = static_cast<const unsigned char*>(a.raw_data());
  const auto* pb = static_cast<const unsigned char*>(b.raw_data());
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(pa + i * elem, pb + i * elem, elem) != 0) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << a.numel() << " elements differ, first at " << first;
}

std::vector<SimdLevel> SupportedLevels() {
  std::vector<SimdLevel> out;
  for (SimdLevel l : {SimdLevel::kScalar, SimdLevel::kAvx2, SimdLevel::kAvx512}) {
    if (CpuSupports(l)) out.push_back(l);
  }
  return out;
}

struct State {
  Tensor master, m, v, w;
};

State RandomState(int64_t n, uint64_t seed) {
  State s{RandomUniform({n}, seed), RandomUniform({n}, seed + 1, -0.1f, 0.1f),
          RandomUniform({n}, seed + 2, 0.0f, 0.01f), Tensor::Cpu({n}, DType::kBF16)};
  return s;
}

TEST(CpuAdamWTest, EverySimdLevelIsBitwiseEqualToOpsAdamW) {
  auto ctx = ops::Context::Cpu();
  const std::vector<SimdLevel> levels = SupportedLevels();
  ASSERT_FALSE(levels.empty());
  uint64_t seed = 100;
  for (int64_t n : {1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000, 4099}) {
    for (float wd : {0.0f, 0.1f}) {
      State ref = RandomState(n, seed += 10);
      std::vector<State> mine;
      for (size_t k = 0; k < levels.size(); ++k) {
        mine.push_back(
            {Clone(ref.master), Clone(ref.m), Clone(ref.v), Tensor::Cpu({n}, DType::kBF16)});
      }
      ops::AdamWParams p;
      p.lr = 3e-3f;
      p.beta2 = 0.95f;
      p.eps = 1e-6f;
      p.weight_decay = wd;
      for (int step = 1; step <= 3; ++step) {
        p.step = step;
        p.grad_scale = step == 2 ? 0.37f : 1.0f;
        const Tensor grad = RandomUniform({n}, seed + step, -2.0f, 2.0f);
        ASSERT_TRUE(ops::AdamW(*ctx, ref.master, ref.m, ref.v, ref.w, grad, p).ok());
        const AdamWScalars s = MakeAdamWScalars(p);
        for (size_t k = 0; k < levels.size(); ++k) {
          State& x = mine[k];
          CpuAdamWRange(s, x.master.data<float>(), x.m.data<float>(), x.v.data<float>(),
                        x.w.data<Bf16>(), grad.data<float>(), n, levels[k]);
        }
      }
      for (size_t k = 0; k < levels.size(); ++k) {
        SCOPED_TRACE(StrCat("n=", n, " wd=", wd, " simd=", SimdLevelName(levels[k])));
        EXPECT_TRUE(BitsEqual(mine[k].master, ref.master, "master"));
        EXPECT_TRUE(BitsEqual(mine[k].m, ref.m, "m"));
        EXPECT_TRUE(BitsEqual(mine[k].v, ref.v, "v"));
        EXPECT_TRUE(BitsEqual(mine[k].w, ref.w, "weights_bf16"));
      }
    }
  }
}

// Non-finite inputs: bf16 rounding of NaN, inf and values that round up to inf.
TEST(CpuAdamWTest, NonFiniteValuesRoundLikeTheReference) {
  auto ctx = ops::Context::Cpu();
  const int64_t n = 40;
  State ref = RandomState(n, 7);
  Tensor grad = RandomUniform({n}, 8);
  const float inf = std::numeric_limits<float>::infinity();
  grad.data<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  grad.data<float>()[20] = -inf;
  ref.master.data<float>()[5] = inf;
  ref.master.data<float>()[21] = -std::numeric_limits<float>::quiet_NaN();
  ref.master.data<float>()[22] = 3.4028e38f;  // rounds to bf16 inf
  ref.master.data<float>()[37] = 1.0e-40f;    // subnormal
  ops::AdamWParams p;
  p.weight_decay = 0.0f;
  p.lr = 1e-8f;
  for (SimdLevel level : SupportedLevels()) {
    State x{Clone(ref.master), Clone(ref.m), Clone(ref.v), Tensor::Cpu({n}, DType::kBF16)};
    CpuAdamWRange(MakeAdamWScalars(p), x.master.data<float>(), x.m.data<float>(), x.v.data<float>(),
                  x.w.data<Bf16>(), grad.data<float>(), n, level);
    State r{Clone(ref.master), Clone(ref.m), Clone(ref.v), Tensor::Cpu({n}, DType::kBF16)};
    ASSERT_TRUE(ops::AdamW(*ctx, r.master, r.m, r.v, r.w, grad, p).ok());
    SCOPED_TRACE(SimdLevelName(level));
    EXPECT_TRUE(BitsEqual(x.master, r.master, "master"));
    EXPECT_TRUE(BitsEqual(x.w, r.w, "weights_bf16"));
    EXPECT_TRUE(std::isnan(x.master.data<float>()[3]));
  }
}

TEST(CpuAdamWTest, MultithreadedTensorApiMatchesAndValidates) {
  auto ctx = ops::Context::Cpu();
  const int64_t n = 70001;
  State ref = RandomState(n, 77);
  State x{Clone(ref.master), Clone(ref.m), Clone(ref.v), Tensor::Cpu({n}, DType::kBF16)};
  const Tensor grad = RandomUniform({n}, 78);
  ops::AdamWParams p;
  p.weight_decay = 0.01f;
  p.step = 5;
  ASSERT_TRUE(ops::AdamW(*ctx, ref.master, ref.m, ref.v, ref.w, grad, p).ok());
  CpuAdamWOptions o;
  o.num_threads = 2;
  o.chunk_elems = 4097;
  ASSERT_TRUE(CpuAdamW(x.master, x.m, x.v, x.w, grad, p, o).ok());
  EXPECT_TRUE(BitsEqual(x.master, ref.master, "master"));
  EXPECT_TRUE(BitsEqual(x.m, ref.m, "m"));
  EXPECT_TRUE(BitsEqual(x.v, ref.v, "v"));
  EXPECT_TRUE(BitsEqual(x.w, ref.w, "weights_bf16"));

  Tensor no_weights;  // optional
  EXPECT_TRUE(CpuAdamW(x.master, x.m, x.v, no_weights, grad, p, o).ok());
  Tensor short_v = Tensor::Cpu({n - 1}, DType::kF32);
  const Status st = CpuAdamW(x.master, x.m, short_v, x.w, grad, p, o);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("'v'"), std::string::npos) << st.message();
  Tensor f32_weights = Tensor::Cpu({n}, DType::kF32);
  EXPECT_EQ(CpuAdamW(x.master, x.m, x.v, f32_weights, grad, p, o).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::offload
