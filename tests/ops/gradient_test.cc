// Every backward op of the CPU reference against central finite differences of the scalar loss
// L = sum(out * R) (R random, L accumulated in f64 from the f32 forward), on small odd sizes.
//
// Tolerance: with h = 1e-2 the f32 forward's rounding contributes about 1e-5 / h = 1e-3 of error
// to a difference quotient at worst, and truncation O(h^2) about 1e-4; so abs 3e-3 + rel 3e-3. A
// wrong gradient is off by O(1).
#include <cmath>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::NumericGradient;
using testing::RandomInts;
using testing::RandomUniform;
using testing::WeightedSum;

constexpr float kStep = 1e-2f;
constexpr testing::Tolerance kFdTol{3e-3, 3e-3};

TEST(GradientTest, EmbeddingBackward) {
  auto ctx = Context::Cpu();
  for (int64_t n : {1, 3, 17}) {
    const int64_t vocab = 5, dim = 3;
    Tensor ids = RandomInts({n}, 10 + n, vocab);
    Tensor table = RandomUniform({vocab, dim}, 20 + n);
    Tensor r = RandomUniform({n, dim}, 30 + n);
    auto loss = [&] {
      Tensor out = Tensor::Cpu({n, dim}, DType::kF32);
      TANDEM_CHECK_OK(EmbeddingForward(*ctx, out, ids, table));
      return WeightedSum(out, r);
    };
    Tensor dtable = Tensor::CpuZeros({vocab, dim}, DType::kF32);
    ASSERT_TRUE(EmbeddingBackward(*ctx, dtable, r, ids).ok());
    EXPECT_TRUE(AllClose(dtable, NumericGradient(loss, table, kStep), kFdTol)) << "N=" << n;
  }
}

TEST(GradientTest, RmsNormBackward) {
  auto ctx = Context::Cpu();
  for (int64_t n : {1, 3, 17}) {
    for (int64_t c : {3, 5, 8}) {  // C = 1 makes y ~ sign(x): too steep for differences
      SCOPED_TRACE(::testing::Message() << "N=" << n << " C=" << c);
      Tensor x = RandomUniform({n, c}, 1 + n * c), w = RandomUniform({c}, 2 + n * c, 0.5f, 1.5f);
      Tensor r = RandomUniform({n, c}, 3 + n * c);
      const float eps = 1e-5f;
      auto loss = [&] {
        Tensor y = Tensor::Cpu({n, c}, DType::kF32), no_rstd;
        TANDEM_CHECK_OK(RmsNormForward(*ctx, y, no_rstd, x, w, eps));
        return WeightedSum(y, r);
      };
      Tensor y = Tensor::Cpu({n, c}, DType::kF32), rstd = Tensor::Cpu({n}, DType::kF32);
      ASSERT_TRUE(RmsNormForward(*ctx, y, rstd, x, w, eps).ok());
      Tensor dx = Tensor::Cpu({n, c}, DType::kF32), dw = Tensor::CpuZeros({c}, DType::kF32);
      ASSERT_TRUE(RmsNormBackward(*ctx, dx, dw, r, x, w, rstd, false).ok());
      EXPECT_TRUE(AllClose(dx, NumericGradient(loss, x, kStep), kFdTol));
      EXPECT_TRUE(AllClose(dw, NumericGradient(loss, w, kStep), kFdTol));
    }
  }
}

TEST(GradientTest, RopeBackwardIsInverseRotation) {
  auto ctx = Context::Cpu();
  for (int64_t n : {1, 3, 17}) {
    for (int64_t d : {2, 8}) {
      const int64_t h = 3;
      Tensor x = RandomUniform({n, h, d}, 5 + n), r = RandomUniform({n, h, d}, 6 + n);
      Tensor pos = RandomInts({n}, 7 + n, 300), inv_freq = testing::InvFreq(d);
      auto loss = [&] {
        Tensor y = Tensor::Cpu({n, h, d}, DType::kF32);
        TANDEM_CHECK_OK(Rope(*ctx, y, x, pos, inv_freq, false));
        return WeightedSum(y, r);
      };
      Tensor dx = Tensor::Cpu({n, h, d}, DType::kF32);
      ASSERT_TRUE(Rope(*ctx, dx, r, pos, inv_freq, true).ok());
      EXPECT_TRUE(AllClose(dx, NumericGradient(loss, x, kStep), kFdTol)) << "N=" << n << " D=" << d;
    }
  }
}

TEST(GradientTest, SwigluBackward) {
  auto ctx = Context::Cpu();
  for (int64_t n : {1, 3, 17}) {
    const int64_t f = 5;
    Tensor gate = RandomUniform({n, f}, 8 + n, -3.0f, 3.0f), up = RandomUniform({n, f}, 9 + n);
    Tensor r = RandomUniform({n, f}, 10 + n);
    auto loss = [&] {
      Tensor out = Tensor::Cpu({n, f}, DType::kF32);
      TANDEM_CHECK_OK(SwigluForward(*ctx, out, gate, up));
      return WeightedSum(out, r);
    };
    Tensor dgate = Tensor::Cpu({n, f}, DType::kF32), dup = Tensor::Cpu({n, f}, DType::kF32);
    ASSERT_TRUE(SwigluBackward(*ctx, dgate, dup, r, gate, up).ok());
    EXPECT_TRUE(AllClose(dgate, NumericGradient(loss, gate, kStep), kFdTol)) << "N=" << n;
    EXPECT_TRUE(AllClose(dup, NumericGradient(loss, up, kStep), kFdTol)) << "N=" << n;
  }
}

TEST(GradientTest, CrossEntropyWithIgnoredRows) {
  auto ctx = Context::Cpu();
  for (int64_t n : {1, 3, 17}) {
    const int64_t v = 7;
    const float grad_scale = 0.7f;
    Tensor logits = RandomUniform({n, v}, 11 + n, -3.0f, 3.0f);
    Tensor targets = RandomInts({n}, 12 + n, v);
    if (n > 1) targets.data<int32_t>()[1] = kIgnoreIndex;
    auto loss = [&] {
      Tensor losses = Tensor::Cpu({n}, DType::kF32), no_grad;
      TANDEM_CHECK_OK(CrossEntropy(*ctx, losses, no_grad, logits, targets, grad_scale));
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += losses.data<float>()[i];
      return grad_scale * sum;
    };
    Tensor losses = Tensor::Cpu({n}, DType::kF32), dlogits = Tensor::Cpu({n, v}, DType::kF32);
    ASSERT_TRUE(CrossEntropy(*ctx, losses, dlogits, logits, targets, grad_scale).ok());
    EXPECT_TRUE(AllClose(dlogits, NumericGradient(loss, logits, kStep), kFdTol)) << "N=" << n;
  }
}

struct AttnCase {
  int64_t b, t, hq, hkv, d;
  bool segments;
};

TEST(GradientTest, AttentionBackward) {
  auto ctx = Context::Cpu();
  const AttnCase cases[] = {{1, 1, 3, 1, 5, false},
                            {2, 3, 3, 1, 8, false},
                            {1, 17, 3, 1, 5, false},
                            {2, 17, 3, 1, 8, true},
                            {1, 17, 4, 2, 5, true}};
  uint64_t seed = 40;
  for (const AttnCase& c : cases) {
    SCOPED_TRACE(::testing::Message() << "B=" << c.b << " T=" << c.t << " Hq=" << c.hq
                                      << " Hkv=" << c.hkv << " D=" << c.d << " seg=" << c.segments);
    Tensor q = RandomUniform({c.b, c.t, c.hq, c.d}, ++seed, -2.0f, 2.0f);
    Tensor k = RandomUniform({c.b, c.t, c.hkv, c.d}, ++seed, -2.0f, 2.0f);
    Tensor v = RandomUniform({c.b, c.t, c.hkv, c.d}, ++seed);
    Tensor r = RandomUniform({c.b, c.t, c.hq, c.d}, ++seed);
    Tensor seg = c.segments ? RandomInts({c.b, c.t}, ++seed, 3) : Tensor();
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
    Tensor out = Tensor::Cpu({c.b, c.t, c.hq, c.d}, DType::kF32);
    Tensor lse = Tensor::Cpu({c.b, c.hq, c.t}, DType::kF32);
    auto loss = [&] {
      TANDEM_CHECK_OK(AttentionForward(*ctx, out, lse, q, k, v, scale, seg));
      return WeightedSum(out, r);
    };
    loss();  // out and lse for the backward
    Tensor dq = Tensor::Cpu(q.shape(), DType::kF32);
    Tensor dk = Tensor::Cpu(k.shape(), DType::kF32), dv = Tensor::Cpu(v.shape(), DType::kF32);
    ASSERT_TRUE(AttentionBackward(*ctx, dq, dk, dv, r, q, k, v, out, lse, scale, seg).ok());
    EXPECT_TRUE(AllClose(dq, NumericGradient(loss, q, kStep), kFdTol));
    EXPECT_TRUE(AllClose(dk, NumericGradient(loss, k, kStep), kFdTol));
    EXPECT_TRUE(AllClose(dv, NumericGradient(loss, v, kStep), kFdTol));
  }
}

}  // namespace
}  // namespace tandem::ops
