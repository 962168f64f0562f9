// CPU attention against a naive f64 attention that materializes the masked score matrix, with
// and without segment ids; known values; a 2-segment batch equals two separate attentions.
#include <cmath>
#include <vector>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::RandomInts;
using testing::RandomUniform;

struct Attn {
  Tensor out, lse;
};

Attn RunForward(Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                const Tensor& seg = Tensor()) {
  Attn r{Tensor::Cpu(q.shape(), DType::kF32),
         Tensor::Cpu({q.dim(0), q.dim(2), q.dim(1)}, DType::kF32)};
  TANDEM_CHECK_OK(AttentionForward(ctx, r.out, r.lse, q, k, v, scale, seg));
  return r;
}

// Naive f64 causal GQA over contiguous [B, T, H, D] tensors.
Attn NaiveAttention(const Tensor& q, const Tensor& k, const Tensor& v, float scale,
                    const Tensor& seg) {
  const int64_t B = q.dim(0), T = q.dim(1), Hq = q.dim(2), D = q.dim(3), Hkv = k.dim(2);
  Attn r{Tensor::Cpu(q.shape(), DType::kF32), Tensor::Cpu({B, Hq, T}, DType::kF32)};
  auto at = [](const Tensor& t, int64_t b, int64_t i, int64_t h, int64_t d) {
    return static_cast<double>(t.data<float>()[((b * t.dim(1) + i) * t.dim(2) + h) * t.dim(3) + d]);
  };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / (Hq / Hkv);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(T, -INFINITY);
        double max_s = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          if (seg.defined() && seg.data<int32_t>()[b * T + j] != seg.data<int32_t>()[b * T + i])
            continue;
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += at(q, b, i, h, d) * at(k, b, j, kvh, d);
          s[j] = scale * dot;
          max_s = std::max(max_s, s[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(s[j] - max_s);
        r.lse.data<float>()[(b * Hq + h) * T + i] = static_cast<float>(max_s + std::log(sum));
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j <= i; ++j) o += std::exp(s[j] - max_s) / sum * at(v, b, j, kvh, d);
          r.out.data<float>()[((b * T + i) * Hq + h) * D + d] = static_cast<float>(o);
        }
      }
    }
  }
  return r;
}

TEST(AttentionCpuTest, MatchesNaiveWithAndWithoutSegments) {
  auto ctx = Context::Cpu();
  struct Case {
    int64_t b, t, hq, hkv, d;
  };
  const Case cases[] = {{1, 1, 3, 1, 5}, {2, 17, 3, 1, 8}, {1, 127, 6, 2, 16}, {2, 33, 4, 4, 64}};
  uint64_t seed = 1;
  for (const Case& c : cases) {
    for (bool use_seg : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "B=" << c.b << " T=" << c.t << " Hq=" << c.hq
                                        << " Hkv=" << c.hkv << " D=" << c.d << " seg=" << use_seg);
      Tensor q = RandomUniform({c.b, c.t, c.hq, c.d}, ++seed, -2.0f, 2.0f);
      Tensor k = RandomUniform({c.b, c.t, c.hkv, c.d}, ++seed, -2.0f, 2.0f);
      Tensor v = RandomUniform({c.b, c.t, c.hkv, c.d}, ++seed);
      // Interleaved (not only contiguous) segments: visibility is equality of ids.
      Tensor seg = use_seg ? RandomInts({c.b, c.t}, ++seed, 3) : Tensor();
      const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
      Attn got = RunForward(*ctx, q, k, v, scale, seg);
      Attn want = NaiveAttention(q, k, v, scale, seg);
      // f32 dot products over D and weighted sums over T: 1e-5 of values of magnitude ~1.
      EXPECT_TRUE(AllClose(got.out, want.out, {2e-6 * c.d, 1e-5}));
      EXPECT_TRUE(AllClose(got.lse, want.lse, {2e-6 * c.d, 1e-5}));
    }
  }
}

TEST(AttentionCpuTest, KnownValues) {
  auto ctx = Context::Cpu();
  // q = 0: every visible key has equal weight, so out_i = mean_{j <= i} v_j and lse_i = log(i + 1).
  const int64_t T = 5, D = 3;
  Tensor q = Tensor::CpuZeros({1, T, 1, D}, DType::kF32);
  Tensor k = RandomUniform({1, T, 1, D}, 7), v = RandomUniform({1, T, 1, D}, 8);
  Attn r = RunForward(*ctx, q, k, v, 0.5f);
  for (int64_t i = 0; i < T; ++i) {
    EXPECT_NEAR(r.lse.data<float>()[i], std::log(i + 1.0), 1e-6);
    for (int64_t d = 0; d < D; ++d) {
      double mean = 0.0;
      for (int64_t j = 0; j <= i; ++j) mean += v.data<float>()[j * D + d];
      EXPECT_NEAR(r.out.data<float>()[i * D + d], mean / (i + 1), 1e-6);
    }
  }
}

TEST(AttentionCpuTest, TwoSegmentsEqualTwoSeparateAttentions) {
  auto ctx = Context::Cpu();
  const int64_t T = 17, split = 7, Hq = 3, Hkv = 1, D = 8;
  const float scale = 0.3f;
  Tensor q = RandomUniform({1, T, Hq, D}, 9), k = RandomUniform({1, T, Hkv, D}, 10);
  Tensor v = RandomUniform({1, T, Hkv, D}, 11), dout = RandomUniform({1, T, Hq, D}, 12);
  Tensor seg = Tensor::Cpu({1, T}, DType::kI32);
  for (int64_t t = 0; t < T; ++t) seg.data<int32_t>()[t] = t < split ? 4 : 9;
  Attn packed = RunForward(*ctx, q, k, v, scale, seg);
  Tensor dq = Tensor::Cpu(q.shape(), DType::kF32), dk = Tensor::Cpu(k.shape(), DType::kF32);
  Tensor dv = Tensor::Cpu(v.shape(), DType::kF32);
  ASSERT_TRUE(
      AttentionBackward(*ctx, dq, dk, dv, dout, q, k, v, packed.out, packed.lse, scale, seg).ok());

  for (auto [t0, t1] : {std::pair<int64_t, int64_t>{0, split}, {split, T}}) {
    SCOPED_TRACE(::testing::Message() << "tokens [" << t0 << ", " << t1 << ")");
    auto part = [&](const Tensor& x) { return testing::Clone(x.Slice(1, t0, t1)); };
    Tensor sq = part(q), sk = part(k), sv = part(v), sdout = part(dout);
    Attn alone = RunForward(*ctx, sq, sk, sv, scale);
    Tensor sdq = Tensor::Cpu(sq.shape(), DType::kF32), sdk = Tensor::Cpu(sk.shape(), DType::kF32);
    Tensor sdv = Tensor::Cpu(sv.shape(), DType::kF32);
    ASSERT_TRUE(
        AttentionBackward(*ctx, sdq, sdk, sdv, sdout, sq, sk, sv, alone.out, alone.lse, scale)
            .ok());
    const testing::Tolerance tight{1e-6, 1e-6};
    EXPECT_TRUE(AllClose(part(packed.out), alone.out, tight));
    EXPECT_TRUE(AllClose(part(dq), sdq, tight));
    EXPECT_TRUE(AllClose(part(dk), sdk, tight));
    EXPECT_TRUE(AllClose(part(dv), sdv, tight));
    Tensor lse_part = Tensor::Cpu({1, Hq, t1 - t0}, DType::kF32);
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t t = t0; t < t1; ++t) {
        lse_part.data<float>()[h * (t1 - t0) + t - t0] = packed.lse.data<float>()[h * T + t];
      }
    }
    EXPECT_TRUE(AllClose(lse_part, alone.lse, tight));
  }
}

TEST(AttentionCpuTest, FusedQkvViewsMatchContiguousCopies) {
  auto ctx = Context::Cpu();
  const int64_t B = 2, T = 9, Hq = 4, Hkv = 2, D = 8;
  Tensor qkv = RandomUniform({B, T, Hq + 2 * Hkv, D}, 13);
  Tensor q = qkv.Slice(2, 0, Hq), k = qkv.Slice(2, Hq, Hq + Hkv),
         v = qkv.Slice(2, Hq + Hkv, Hq + 2 * Hkv);
  Tensor dqkv = Tensor::CpuZeros(qkv.shape(), DType::kF32);
  Tensor dq = dqkv.Slice(2, 0, Hq), dk = dqkv.Slice(2, Hq, Hq + Hkv);
  Tensor dv = dqkv.Slice(2, Hq + Hkv, Hq + 2 * Hkv);
  Tensor out = Tensor::Cpu({B, T, Hq, D}, DType::kF32), lse = Tensor::Cpu({B, Hq, T}, DType::kF32);
  ASSERT_TRUE(AttentionForward(*ctx, out, lse, q, k, v, 0.35f).ok());
  Tensor dout = RandomUniform({B, T, Hq, D}, 14);
  ASSERT_TRUE(AttentionBackward(*ctx, dq, dk, dv, dout, q, k, v, out, lse, 0.35f).ok());

  Tensor cq = testing::Clone(q), ck = testing::Clone(k), cv = testing::Clone(v);
  Attn ref = RunForward(*ctx, cq, ck, cv, 0.35f);
  Tensor rdq = Tensor::Cpu(cq.shape(), DType::kF32), rdk = Tensor::Cpu(ck.shape(), DType::kF32);
  Tensor rdv = Tensor::Cpu(cv.shape(), DType::kF32);
  ASSERT_TRUE(
      AttentionBackward(*ctx, rdq, rdk, rdv, dout, cq, ck, cv, ref.out, ref.lse, 0.35f).ok());
  EXPECT_TRUE(testing::BitwiseEqual(out, ref.out));
  EXPECT_TRUE(testing::BitwiseEqual(testing::Clone(dq), rdq));
  EXPECT_TRUE(testing::BitwiseEqual(testing::Clone(dk), rdk));
  EXPECT_TRUE(testing::BitwiseEqual(testing::Clone(dv), rdv));
}

}  // namespace
}  // namespace tandem::ops
