// ops::AdamWBf16Multi on the CPU (the reference): the f32 math of AdamW, with every bf16 result
// one of the two bf16 neighbours of AdamW's f32 result; stochastic rounding that keeps updates
// below half a bf16 step in expectation (round-to-nearest loses them); noise fixed by the key;
// the rounding helper's special values; bad entries refused naming the entry.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "ops/internal/stochastic_round.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "tests/ops/adamw_bf16_case.h"

namespace tandem::ops {
namespace {

using testing::Bf16StateCase;
using testing::HostF32;

// True when the bf16 value b is f rounded down or up in magnitude (or f itself).
bool IsBf16Neighbour(float b, float f) {
  const uint32_t fb = FloatBits(f), bb = FloatBits(b);
  if ((bb & 0xFFFFu) != 0) return false;
  return bb >> 16 == fb >> 16 || (bb >> 16 == (fb >> 16) + 1 && (fb & 0xFFFFu) != 0);
}

TEST(AdamWBf16Test, EveryResultIsANeighbourOfTheF32Update) {
  auto ctx = Context::Cpu();
  const int64_t step = 5;
  Bf16StateCase c = testing::MakeBf16StateCase(*ctx, 40, step);
  // The f32 reference: AdamW on f32 copies of the same inputs.
  std::vector<Tensor> master, m, v;
  for (size_t i = 0; i < c.param.size(); ++i) {
    master.push_back(HostF32(c.param[i]));
    m.push_back(HostF32(c.m[i]));
    v.push_back(HostF32(c.v[i]));
  }
  ASSERT_TRUE(testing::RunBf16State(*ctx, c, testing::Bf16StateParams(step)).ok());
  int64_t rounded_up = 0, total = 0;
  for (size_t i = 0; i < c.param.size(); ++i) {
    AdamWParams p = testing::Bf16StateParams(step);
    p.weight_decay = c.decay[i];
    Tensor none;
    ASSERT_TRUE(AdamW(*ctx, master[i], m[i], v[i], none, HostF32(c.grad[i]), p).ok());
    const Tensor got_p = HostF32(c.param[i]), got_m = HostF32(c.m[i]), got_v = HostF32(c.v[i]);
    const bool f32_param = c.param[i].dtype() == DType::kF32;
    for (int64_t k = 0; k < got_p.numel(); ++k) {
      const float want_p = master[i].data<float>()[k];
      if (f32_param) {
        ASSERT_EQ(FloatBits(got_p.data<float>()[k]), FloatBits(want_p))
            << "entry " << i << " " << k;
      } else {
        ASSERT_TRUE(IsBf16Neighbour(got_p.data<float>()[k], want_p))
            << "param of entry " << i << " element " << k << ": " << got_p.data<float>()[k]
            << " for " << want_p;
      }
      const float want_m = m[i].data<float>()[k], want_v = v[i].data<float>()[k];
      ASSERT_TRUE(IsBf16Neighbour(got_m.data<float>()[k], want_m)) << "m " << i << " " << k;
      ASSERT_TRUE(IsBf16Neighbour(got_v.data<float>()[k], want_v)) << "v " << i << " " << k;
      rounded_up += std::abs(got_v.data<float>()[k]) > std::abs(want_v);
      ++total;
    }
  }
  // Not a rounding that always goes one way.
  EXPECT_GT(rounded_up, total / 10);
  EXPECT_LT(rounded_up, total * 9 / 10);
}

// bf16 parameters at 1.0, one Adam step of lr 1e-3 (the first step moves every element by lr):
// 0.999 lies 0.256 of a bf16 step below 1.0, which round-to-nearest would return unchanged.
TEST(AdamWBf16Test, StochasticRoundingKeepsSmallUpdatesInExpectation) {
  auto ctx = Context::Cpu();
  const int64_t n = 1 << 16;
  Tensor param = Tensor::Cpu({n}, DType::kBF16), m = Tensor::CpuZeros({n}, DType::kBF16);
  Tensor v = Tensor::CpuZeros({n}, DType::kBF16), grad = Tensor::Cpu({n}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) {
    param.data<Bf16>()[i] = FloatToBf16(1.0f);
    grad.data<float>()[i] = 0.5f;
  }
  AdamWParams p;
  p.lr = 1e-3f;
  p.step = 1;
  const std::vector<AdamWBf16Tensors> entries = {
      {&param, &m, &v, &grad, 0.0f, AdamWNoiseKey(7, 1, 0)}};
  ASSERT_TRUE(AdamWBf16Multi(*ctx, entries, p).ok());
  double sum = 0;
  int64_t down = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = Bf16ToFloat(param.data<Bf16>()[i]);
    ASSERT_TRUE(x == 1.0f || x == 1.0f - 1.0f / 256) << x;
    down += x < 1.0f;
    sum += x;
  }
  const double exact =
      1.0 - 1e-3 / (1.0 + 1e-8 / 0.5);  // m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
  EXPECT_NEAR(sum / n, exact, 3e-5);    // round-to-nearest: 1.0, off by 1e-3
  EXPECT_NEAR(static_cast<double>(down) / n, (1.0 - exact) * 256, 0.01);
}

TEST(AdamWBf16Test, TheKeyFixesTheNoise) {
  auto ctx = Context::Cpu();
  auto run = [&](uint64_t key_step) {
    Bf16StateCase c = testing::MakeBf16StateCase(*ctx, 6, key_step);
    EXPECT_TRUE(testing::RunBf16State(*ctx, c, testing::Bf16StateParams(3)).ok());
    return c;
  };
  const Bf16StateCase a = run(3), b = run(3), other = run(4);
  int64_t differ = 0;
  for (size_t i = 0; i < a.v.size(); ++i) {
    const Tensor x = HostF32(a.v[i]), y = HostF32(b.v[i]), z = HostF32(other.v[i]);
    for (int64_t k = 0; k < x.numel(); ++k) {
      ASSERT_EQ(FloatBits(x.data<float>()[k]), FloatBits(y.data<float>()[k]));
      differ += FloatBits(x.data<float>()[k]) != FloatBits(z.data<float>()[k]);
    }
  }
  EXPECT_GT(differ, 100);  // another step's key draws other noise
  EXPECT_NE(AdamWNoiseKey(1, 2, 3), AdamWNoiseKey(1, 2, 4));
  EXPECT_NE(AdamWNoiseKey(1, 2, 3), AdamWNoiseKey(1, 3, 3));
  EXPECT_NE(AdamWNoiseKey(1, 2, 3), AdamWNoiseKey(2, 2, 3));
}

TEST(AdamWBf16Test, RoundingKeepsSpecialAndExactValues) {
  using internal::StochasticBf16Bits;
  const float inf = std::numeric_limits<float>::infinity();
  for (uint32_t r : {0u, 1u, 0x7FFFu, 0xFFFFu}) {
    EXPECT_EQ(StochasticBf16Bits(inf, r), FloatToBf16(inf).bits);
    EXPECT_EQ(StochasticBf16Bits(-inf, r), FloatToBf16(-inf).bits);
    EXPECT_TRUE(std::isnan(Bf16ToFloat(Bf16{StochasticBf16Bits(std::nanf(""), r)})));
    // A NaN whose payload lies in the low half only stays a NaN.
    EXPECT_TRUE(std::isnan(Bf16ToFloat(Bf16{StochasticBf16Bits(BitsToFloat(0x7F800001u), r)})));
    for (float exact : {0.0f, -0.0f, 1.0f, -3.5f, 1e-30f}) {
      const float e = RoundToBf16(exact);
      EXPECT_EQ(StochasticBf16Bits(e, r), FloatToBf16(e).bits) << e;
    }
  }
  // Halfway between 1 and the next bf16: down for noise below 2^15, up from it.
  const float half = BitsToFloat(0x3F808000u);
  EXPECT_EQ(StochasticBf16Bits(half, 0x7FFFu), 0x3F80u);
  EXPECT_EQ(StochasticBf16Bits(half, 0x8000u), 0x3F81u);
  EXPECT_EQ(StochasticBf16Bits(-half, 0x8000u), 0xBF81u);  // magnitude up: away from zero
}

TEST(AdamWBf16Test, BadEntriesNameTheEntry) {
  auto ctx = Context::Cpu();
  Tensor p = Tensor::CpuZeros({4}, DType::kBF16), m = Tensor::CpuZeros({4}, DType::kBF16);
  Tensor v = Tensor::CpuZeros({4}, DType::kBF16), g = Tensor::CpuZeros({4}, DType::kF32);
  Tensor m32 = Tensor::CpuZeros({4}, DType::kF32), short_v = Tensor::CpuZeros({3}, DType::kBF16);
  AdamWParams params;
  std::vector<AdamWBf16Tensors> entries = {{&p, &m, &v, &g, 0.0f, 1}, {&p, &m32, &v, &g, 0.0f, 2}};
  Status s = AdamWBf16Multi(*ctx, entries, params);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.ToString().find("entry 1"), std::string::npos) << s.ToString();
  EXPECT_NE(s.ToString().find("'m'"), std::string::npos) << s.ToString();
  entries[1] = {&p, &m, &short_v, &g, 0.0f, 2};
  s = AdamWBf16Multi(*ctx, entries, params);
  EXPECT_NE(s.ToString().find("'v'"), std::string::npos) << s.ToString();
  entries[1] = {&p, &m, &v, nullptr, 0.0f, 2};
  EXPECT_NE(AdamWBf16Multi(*ctx, entries, params).ToString().find("entry 1"), std::string::npos);
  params.step = 0;
  entries.resize(1);
  EXPECT_NE(AdamWBf16Multi(*ctx, entries, params).ToString().find("1-based"), std::string::npos);
}

}  // namespace
}  // namespace tandem::ops
