// Segmented multi-adapter LoRA ops on the CPU (ops/lora.h): against a dense per-token reference
// written here from the header's formulas (f64, the dropout mask recomputed from core/rng.h's
// Philox), against finite differences, and their validation errors.
#include "ops/lora.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::Clone;
using testing::NumericGradient;
using testing::RandomUniform;
using testing::WeightedSum;

constexpr uint64_t kSeed = 0x5eed;

// The mask of ops/lora.h, written out from its documentation.
double RefMask(uint64_t seed, int64_t n, int64_t c, float p) {
  if (p == 0.0f) return 1.0;
  const uint32_t word = Philox4x32(seed, static_cast<uint64_t>(n),
                                   static_cast<uint64_t>(c / 4))[static_cast<int>(c % 4)];
  const float u = static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
  return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

struct Segment {
  int32_t len;
  int32_t adapter;
};

// One projection with several adapters, its batch and random inputs (host f32).
struct Problem {
  int64_t in = 0, out = 0, N = 0;
  std::vector<int32_t> seg_start, seg_adapter, ranks;
  std::vector<float> scale, dropout;
  std::vector<Tensor> A, B;         // [r, in], [out, r] (undefined for rank 0)
  Tensor x, y0, dy, dx0;            // [N, in], [N, out], [N, out], [N, in]
  std::vector<int32_t> adapter_of;  // per token, -1 without an effective adapter
  std::vector<int64_t> h_row;       // per token, element offset of its h row
  int64_t h_numel = 0;
};

Problem MakeProblem(uint64_t seed, int64_t in, int64_t out, const std::vector<Segment>& segments,
                    const std::vector<int32_t>& ranks, const std::vector<float>& dropout) {
  Problem p;
  p.in = in;
  p.out = out;
  p.ranks = ranks;
  p.dropout = dropout;
  p.seg_start.push_back(0);
  for (const Segment& s : segments) {
    p.seg_start.push_back(p.seg_start.back() + s.len);
    p.seg_adapter.push_back(s.adapter);
    for (int32_t t = 0; t < s.len; ++t) {
      const bool active = s.adapter >= 0 && ranks[s.adapter] > 0;
      p.adapter_of.push_back(active ? s.adapter : -1);
      p.h_row.push_back(p.h_numel);
      if (active) p.h_numel += ranks[s.adapter];
    }
  }
  p.N = p.seg_start.back();
  for (size_t a = 0; a < ranks.size(); ++a) {
    p.scale.push_back(0.5f + 0.25f * static_cast<float>(a));
    if (ranks[a] == 0) {
      p.A.emplace_back();
      p.B.emplace_back();
      continue;
    }
    p.A.push_back(RandomUniform({ranks[a], in}, seed + 10 * a + 1));
    p.B.push_back(RandomUniform({out, ranks[a]}, seed + 10 * a + 2));
  }
  p.x = RandomUniform({p.N, in}, seed + 100);
  p.y0 = RandomUniform({p.N, out}, seed + 101);
  p.dy = RandomUniform({p.N, out}, seed + 102);
  p.dx0 = RandomUniform({p.N, in}, seed + 103);
  return p;
}

struct Tables {
  LoraSegments segs;
  LoraWeights w, grads;
  std::vector<Tensor> dA, dB;  // f32 zeros, host
};

Tables MakeTables(Context& ctx, const Problem& p) {
  Tables t;
  t.segs = *LoraSegments::Create(ctx, p.seg_start, p.seg_adapter, p.ranks);
  std::vector<LoraWeights::Entry> we, ge;
  for (size_t a = 0; a < p.ranks.size(); ++a) {
    we.push_back({p.A[a], p.B[a], p.scale[a], p.dropout[a]});
    if (p.ranks[a] == 0) {
      t.dA.emplace_back();
      t.dB.emplace_back();
    } else {
      t.dA.push_back(Tensor::CpuZeros(p.A[a].shape(), DType::kF32));
      t.dB.push_back(Tensor::CpuZeros(p.B[a].shape(), DType::kF32));
    }
    ge.push_back({t.dA.back(), t.dB.back()});
  }
  t.w = *LoraWeights::Create(ctx, p.in, p.out, we);
  t.grads = *LoraWeights::Create(ctx, p.in, p.out, ge);
  return t;
}

// Dense per-token reference of every output, in f64 (stored as f32 for comparison).
struct Reference {
  Tensor h, y, dh, dx;  // packed [h_numel], [N, out], packed, [N, in]
  std::vector<Tensor> dA, dB;
};

Reference ComputeReference(const Problem& p) {
  Reference r;
  r.h = Tensor::CpuZeros({p.h_numel}, DType::kF32);
  r.dh = Tensor::CpuZeros({p.h_numel}, DType::kF32);
  r.y = Clone(p.y0);
  r.dx = Clone(p.dx0);
  std::vector<std::vector<double>> dA(p.ranks.size()), dB(p.ranks.size());
  for (size_t a = 0; a < p.ranks.size(); ++a) {
    dA[a].assign(p.ranks[a] * p.in, 0.0);
    dB[a].assign(p.out * p.ranks[a], 0.0);
  }
  for (int64_t n = 0; n < p.N; ++n) {
    const int32_t a = p.adapter_of[n];
    if (a < 0) continue;
    const int64_t rk = p.ranks[a];
    const float* A = p.A[a].data<float>();
    const float* B = p.B[a].data<float>();
    const double s = p.scale[a];
    std::vector<double> xd(p.in), h(rk, 0.0), dh(rk, 0.0);
    for (int64_t c = 0; c < p.in; ++c) {
      xd[c] = p.x.data<float>()[n * p.in + c] * RefMask(kSeed, n, c, p.dropout[a]);
    }
    for (int64_t j = 0; j < rk; ++j) {
      for (int64_t c = 0; c < p.in; ++c) h[j] += xd[c] * A[j * p.in + c];
      r.h.data<float>()[p.h_row[n] + j] = static_cast<float>(h[j]);
    }
    for (int64_t o = 0; o < p.out; ++o) {
      double acc = 0.0;
      for (int64_t j = 0; j < rk; ++j) acc += h[j] * B[o * rk + j];
      r.y.data<float>()[n * p.out + o] += static_cast<float>(s * acc);
      const double g = p.dy.data<float>()[n * p.out + o];
      for (int64_t j = 0; j < rk; ++j) {
        dh[j] += s * g * B[o * rk + j];
        dB[a][o * rk + j] += s * g * h[j];
      }
    }
    for (int64_t j = 0; j < rk; ++j) {
      r.dh.data<float>()[p.h_row[n] + j] = static_cast<float>(dh[j]);
      for (int64_t c = 0; c < p.in; ++c) dA[a][j * p.in + c] += dh[j] * xd[c];
    }
    for (int64_t c = 0; c < p.in; ++c) {
      double acc = 0.0;
      for (int64_t j = 0; j < rk; ++j) acc += dh[j] * A[j * p.in + c];
      r.dx.data<float>()[n * p.in + c] +=
          static_cast<float>(RefMask(kSeed, n, c, p.dropout[a]) * acc);
    }
  }
  for (size_t a = 0; a < p.ranks.size(); ++a) {
    Tensor ta = Tensor::Cpu({p.ranks[a], p.in}, DType::kF32);
    Tensor tb = Tensor::Cpu({p.out, p.ranks[a]}, DType::kF32);
    for (size_t i = 0; i < dA[a].size(); ++i) ta.data<float>()[i] = static_cast<float>(dA[a][i]);
    for (size_t i = 0; i < dB[a].size(); ++i) tb.data<float>()[i] = static_cast<float>(dB[a][i]);
    r.dA.push_back(ta);
    r.dB.push_back(tb);
  }
  return r;
}

constexpr testing::Tolerance kTol{2e-5, 2e-5};

void CheckAgainstReference(const Problem& p) {
  auto ctx = Context::Cpu();
  Tables t = MakeTables(*ctx, p);
  const Reference ref = ComputeReference(p);
  ASSERT_EQ(t.segs.h_numel(), p.h_numel);

  Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
  ASSERT_TRUE(LoraShrink(*ctx, h, p.x, t.w, t.segs, kSeed).ok());
  EXPECT_TRUE(AllClose(h, ref.h, kTol)) << "h";
  Tensor y = Clone(p.y0);
  ASSERT_TRUE(LoraExpand(*ctx, y, h, t.w, t.segs).ok());
  EXPECT_TRUE(AllClose(y, ref.y, kTol)) << "y";

  Tensor dh = Tensor::Cpu({p.h_numel}, DType::kF32);
  ASSERT_TRUE(LoraExpandBackward(*ctx, dh, &t.grads, p.dy, h, t.w, t.segs).ok());
  EXPECT_TRUE(AllClose(dh, ref.dh, kTol)) << "dh";
  Tensor dx = Clone(p.dx0);
  ASSERT_TRUE(LoraShrinkBackward(*ctx, dx, &t.grads, dh, p.x, t.w, t.segs, kSeed).ok());
  EXPECT_TRUE(AllClose(dx, ref.dx, kTol)) << "dx";
  for (size_t a = 0; a < p.ranks.size(); ++a) {
    if (p.ranks[a] == 0) continue;
    EXPECT_TRUE(AllClose(t.dA[a], ref.dA[a], kTol)) << "dA of adapter " << a;
    EXPECT_TRUE(AllClose(t.dB[a], ref.dB[a], kTol)) << "dB of adapter " << a;
  }
}

TEST(LoraOpsTest, MixedRanksAndSegmentsMatchDenseReference) {
  // Ranks 1, 8, 16 and a rank-0 adapter; segments of length 1, 3, 127, empty ones, repeats of
  // one adapter and tokens without an adapter.
  const Problem p =
      MakeProblem(1, 37, 45, {{1, 0}, {3, 2}, {0, 1}, {127, 1}, {5, -1}, {3, 3}, {2, 0}, {1, 2}},
                  {1, 8, 16, 0}, {0.0f, 0.0f, 0.0f, 0.0f});
  CheckAgainstReference(p);
}

TEST(LoraOpsTest, DropoutMatchesDenseReference) {
  const Problem p = MakeProblem(2, 29, 19, {{7, 0}, {4, 1}, {9, 0}, {2, -1}}, {4, 3}, {0.3f, 0.6f});
  CheckAgainstReference(p);
}

TEST(LoraOpsTest, OneSegmentIsAPlainGemmLayout) {
  // A batch that is one adapter's only segment packs h as [N, r] row-major.
  const Problem p = MakeProblem(3, 11, 13, {{9, 0}}, {5}, {0.0f});
  auto ctx = Context::Cpu();
  Tables t = MakeTables(*ctx, p);
  Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
  ASSERT_TRUE(LoraShrink(*ctx, h, p.x, t.w, t.segs, kSeed).ok());
  Tensor expect = Tensor::Cpu({9, 5}, DType::kF32);
  ASSERT_TRUE(Matmul(*ctx, expect, p.x, p.A[0], false, true).ok());
  EXPECT_TRUE(AllClose(h.View({9, 5}), expect, kTol));
}

TEST(LoraOpsTest, StridedViewsAndUntouchedColumns) {
  // y and dy are column blocks of wider fused outputs; the other columns must not change.
  const Problem p = MakeProblem(4, 16, 12, {{3, 0}, {2, -1}, {4, 1}}, {2, 6}, {0.0f, 0.25f});
  auto ctx = Context::Cpu();
  Tables t = MakeTables(*ctx, p);
  const Reference ref = ComputeReference(p);
  Tensor fused = RandomUniform({p.N, 30}, 77);
  Tensor y = fused.Slice(1, 10, 22);  // [N, 12], row stride 30, starts as y0
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t o = 0; o < p.out; ++o) {
      fused.data<float>()[n * 30 + 10 + o] = p.y0.data<float>()[n * p.out + o];
    }
  }
  const Tensor before = Clone(fused);
  Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
  Tensor x_wide = RandomUniform({p.N, 20}, 78);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t c = 0; c < p.in; ++c) {
      x_wide.data<float>()[n * 20 + 4 + c] = p.x.data<float>()[n * p.in + c];
    }
  }
  const Tensor x = x_wide.Slice(1, 4, 20);
  ASSERT_TRUE(LoraShrink(*ctx, h, x, t.w, t.segs, kSeed).ok());
  ASSERT_TRUE(LoraExpand(*ctx, y, h, t.w, t.segs).ok());
  EXPECT_TRUE(AllClose(Clone(y), ref.y, kTol));
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t c = 0; c < 30; ++c) {
      if (c >= 10 && c < 22) continue;
      ASSERT_EQ(fused.data<float>()[n * 30 + c], before.data<float>()[n * 30 + c]) << n << "," << c;
    }
  }
}

// d/dx, d/dA, d/dB of L = sum(G * (y0 + expand(shrink(x)))) by central differences.
TEST(LoraOpsTest, GradientsMatchFiniteDifferences) {
  Problem p = MakeProblem(5, 6, 7, {{2, 0}, {1, -1}, {3, 1}, {2, 0}}, {2, 3}, {0.0f, 0.4f});
  auto ctx = Context::Cpu();
  Tables t = MakeTables(*ctx, p);
  const Tensor G = p.dy;
  auto loss = [&]() {
    Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
    Tensor y = Clone(p.y0);
    TANDEM_CHECK_OK(LoraShrink(*ctx, h, p.x, t.w, t.segs, kSeed));
    TANDEM_CHECK_OK(LoraExpand(*ctx, y, h, t.w, t.segs));
    return WeightedSum(y, G);
  };
  Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
  ASSERT_TRUE(LoraShrink(*ctx, h, p.x, t.w, t.segs, kSeed).ok());
  Tensor dh = Tensor::Cpu({p.h_numel}, DType::kF32);
  Tensor dx = Tensor::CpuZeros({p.N, p.in}, DType::kF32);
  ASSERT_TRUE(LoraExpandBackward(*ctx, dh, &t.grads, G, h, t.w, t.segs).ok());
  ASSERT_TRUE(LoraShrinkBackward(*ctx, dx, &t.grads, dh, p.x, t.w, t.segs, kSeed).ok());

  const testing::Tolerance tol{2e-3, 2e-3};
  EXPECT_TRUE(AllClose(dx, NumericGradient(loss, p.x, 1e-2f), tol)) << "dx";
  for (size_t a = 0; a < p.ranks.size(); ++a) {
    EXPECT_TRUE(AllClose(t.dA[a], NumericGradient(loss, p.A[a], 1e-2f), tol)) << "dA " << a;
    EXPECT_TRUE(AllClose(t.dB[a], NumericGradient(loss, p.B[a], 1e-2f), tol)) << "dB " << a;
  }
  // The token without an adapter gets no input gradient.
  for (int64_t c = 0; c < p.in; ++c) EXPECT_EQ(dx.data<float>()[2 * p.in + c], 0.0f);
}

TEST(LoraOpsTest, DropoutOpMatchesMaskAndRate) {
  auto ctx = Context::Cpu();
  const Tensor x = RandomUniform({64, 50}, 9, 0.5f, 1.5f);
  for (float p : {0.0f, 0.1f, 0.5f}) {
    Tensor y = Tensor::Cpu({64, 50}, DType::kF32);
    ASSERT_TRUE(LoraDropout(*ctx, y, x, 123, p, false).ok());
    int64_t zeros = 0;
    for (int64_t n = 0; n < 64; ++n) {
      for (int64_t c = 0; c < 50; ++c) {
        const float expect =
            x.data<float>()[n * 50 + c] * static_cast<float>(RefMask(123, n, c, p));
        ASSERT_EQ(y.data<float>()[n * 50 + c], expect) << "p=" << p << " at " << n << "," << c;
        zeros += expect == 0.0f;
      }
    }
    // 3200 Bernoulli(p) draws: within 5 standard deviations of the mean.
    const double sd = std::sqrt(3200.0 * p * (1 - p));
    EXPECT_NEAR(static_cast<double>(zeros), 3200.0 * p, 5 * sd + 1e-9) << "p=" << p;
    Tensor acc = Clone(x);
    ASSERT_TRUE(LoraDropout(*ctx, acc, x, 123, p, true).ok());
    for (int64_t i = 0; i < x.numel(); ++i) {
      ASSERT_EQ(acc.data<float>()[i], x.data<float>()[i] + y.data<float>()[i]);
    }
  }
}

TEST(LoraOpsTest, ValidationErrors) {
  auto ctx = Context::Cpu();
  EXPECT_FALSE(LoraSegments::Create(*ctx, {0, 3, 2}, {0, 0}, {4}).ok());  // decreasing
  EXPECT_FALSE(LoraSegments::Create(*ctx, {1, 3}, {0}, {4}).ok());        // not from 0
  EXPECT_FALSE(LoraSegments::Create(*ctx, {0, 3}, {1}, {4}).ok());        // adapter out of range
  EXPECT_FALSE(LoraSegments::Create(*ctx, {0, 3}, {0, 0}, {4}).ok());     // sizes disagree
  EXPECT_FALSE(LoraSegments::Create(*ctx, {0, 3}, {0}, {-1}).ok());       // negative rank

  const Problem p = MakeProblem(6, 8, 10, {{4, 0}, {3, 1}}, {2, 3}, {0.0f, 0.0f});
  Tables t = MakeTables(*ctx, p);
  Tensor h = Tensor::Cpu({p.h_numel}, DType::kF32);
  const Status ok = LoraShrink(*ctx, h, p.x, t.w, t.segs, kSeed);
  EXPECT_TRUE(ok.ok()) << ok.ToString();
  Tensor short_h = Tensor::Cpu({p.h_numel - 1}, DType::kF32);
  Status s = LoraShrink(*ctx, short_h, p.x, t.w, t.segs, kSeed);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'h'"), std::string::npos) << s.message();
  const Tensor wrong_x = RandomUniform({p.N, 9}, 1);
  s = LoraShrink(*ctx, h, wrong_x, t.w, t.segs, kSeed);
  EXPECT_NE(s.message().find("'x'"), std::string::npos) << s.message();
  // Weights whose ranks disagree with the segments.
  const LoraSegments other = *LoraSegments::Create(*ctx, p.seg_start, p.seg_adapter, {2, 4});
  s = LoraShrink(*ctx, h, p.x, t.w, other, kSeed);
  EXPECT_NE(s.message().find("rank"), std::string::npos) << s.message();
  // Bad weight tables.
  EXPECT_FALSE(LoraWeights::Create(*ctx, 8, 10, {{p.A[0], Tensor(), 1.0f, 0.0f}}).ok());
  EXPECT_FALSE(LoraWeights::Create(*ctx, 8, 10, {{p.A[0], p.B[1], 1.0f, 0.0f}}).ok());
  EXPECT_FALSE(LoraWeights::Create(*ctx, 8, 10, {{p.A[0], p.B[0], 1.0f, 1.0f}}).ok());
  EXPECT_FALSE(LoraDropout(*ctx, h, h, 1, 0.5f, false).ok());  // 1-D
}

}  // namespace
}  // namespace tandem::ops
