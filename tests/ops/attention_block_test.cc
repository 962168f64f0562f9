// CPU block attention (the ops ring attention is made of): a causal block is AttentionForward /
// AttentionBackward bit for bit; a full block matches a naive f64 attention with every key
// visible; two chunks composed from blocks + AttentionMerge + summed block gradients equal the
// attention over the whole sequence; AttentionMerge's edge cases; chunk-major moves are exact
// (also through token-stride views); clear errors.
#include <cmath>
#include <vector>

#include "tests/ops/attention_block_test_util.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::BitwiseEqual;
using testing::RandomUniform;

constexpr ::tandem::testing::Tolerance kF32Tol{2e-5, 2e-5};  // f32, another summation order

struct Sizes {
  int64_t b, t, hq, hkv, d;
};
const Sizes kSizes[] = {{1, 2, 1, 1, 4}, {2, 6, 3, 1, 16}, {1, 34, 6, 2, 16}, {2, 18, 4, 4, 5}};

struct Inputs {
  Tensor q, k, v, dout;
  float scale;
};
Inputs MakeInputs(const Sizes& s, uint64_t seed) {
  return {RandomUniform({s.b, s.t, s.hq, s.d}, seed, -2.0f, 2.0f),
          RandomUniform({s.b, s.t, s.hkv, s.d}, seed + 1, -2.0f, 2.0f),
          RandomUniform({s.b, s.t, s.hkv, s.d}, seed + 2),
          RandomUniform({s.b, s.t, s.hq, s.d}, seed + 3),
          1.0f / std::sqrt(static_cast<float>(s.d))};
}

TEST(AttentionBlockCpuTest, CausalBlockIsThePlainOpBitForBit) {
  auto ctx = Context::Cpu();
  const Sizes s{2, 17, 3, 1, 16};
  const Inputs in = MakeInputs(s, 1);
  Tensor o1 = Tensor::Cpu(in.q.shape(), DType::kF32), o2 = Tensor::Cpu(in.q.shape(), DType::kF32);
  Tensor l1 = Tensor::Cpu({s.b, s.hq, s.t}, DType::kF32), l2 = Tensor::Cpu(l1.shape(), DType::kF32);
  ASSERT_TRUE(AttentionForward(*ctx, o1, l1, in.q, in.k, in.v, in.scale).ok());
  ASSERT_TRUE(
      AttentionBlockForward(*ctx, o2, l2, in.q, in.k, in.v, in.scale, AttentionMask::kCausal).ok());
  EXPECT_TRUE(BitwiseEqual(o1, o2));
  EXPECT_TRUE(BitwiseEqual(l1, l2));
  Tensor g1[3], g2[3];
  for (int i = 0; i < 3; ++i) {
    g1[i] = Tensor::Cpu(i == 0 ? in.q.shape() : in.k.shape(), DType::kF32);
    g2[i] = Tensor::Cpu(g1[i].shape(), DType::kF32);
  }
  ASSERT_TRUE(
      AttentionBackward(*ctx, g1[0], g1[1], g1[2], in.dout, in.q, in.k, in.v, o1, l1, in.scale)
          .ok());
  ASSERT_TRUE(AttentionBlockBackward(*ctx, g2[0], g2[1], g2[2], in.dout, in.q, in.k, in.v, o1, l1,
                                     in.scale, AttentionMask::kCausal)
                  .ok());
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(BitwiseEqual(g1[i], g2[i])) << i;
}

// Naive f64 attention with every key visible.
void NaiveFull(const Inputs& in, Tensor& out, Tensor& lse) {
  const int64_t B = in.q.dim(0), T = in.q.dim(1), Hq = in.q.dim(2), D = in.q.dim(3);
  const int64_t Hkv = in.k.dim(2);
  auto at = [](const Tensor& t, int64_t b, int64_t i, int64_t h, int64_t d) {
    return static_cast<double>(t.data<float>()[((b * t.dim(1) + i) * t.dim(2) + h) * t.dim(3) + d]);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t kvh = h / (Hq / Hkv);
        std::vector<double> s(T);
        double mx = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += at(in.q, b, i, h, d) * at(in.k, b, j, kvh, d);
          s[j] = in.scale * dot;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < T; ++j) sum += std::exp(s[j] - mx);
        lse.data<float>()[(b * Hq + h) * T + i] = static_cast<float>(mx + std::log(sum));
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += std::exp(s[j] - mx) / sum * at(in.v, b, j, kvh, d);
          out.data<float>()[((b * T + i) * Hq + h) * D + d] = static_cast<float>(o);
        }
      }
}

TEST(AttentionBlockCpuTest, FullBlockMatchesNaive) {
  auto ctx = Context::Cpu();
  uint64_t seed = 10;
  for (const Sizes& s : kSizes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.b << " T=" << s.t << " Hq=" << s.hq);
    const Inputs in = MakeInputs(s, seed += 10);
    Tensor out = Tensor::Cpu(in.q.shape(), DType::kF32),
           want = Tensor::Cpu(out.shape(), DType::kF32);
    Tensor lse = Tensor::Cpu({s.b, s.hq, s.t}, DType::kF32),
           want_lse = Tensor::Cpu(lse.shape(), DType::kF32);
    ASSERT_TRUE(
        AttentionBlockForward(*ctx, out, lse, in.q, in.k, in.v, in.scale, AttentionMask::kFull)
            .ok());
    NaiveFull(in, want, want_lse);
    EXPECT_TRUE(AllClose(out, want, {1e-5, 1e-5}));
    EXPECT_TRUE(AllClose(lse, want_lse, {1e-5, 1e-5}));
  }
}

TEST(AttentionBlockCpuTest, TwoChunksFromBlocksEqualTheWholeSequence) {
  auto ctx = Context::Cpu();
  uint64_t seed = 50;
  for (const Sizes& s : kSizes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.b << " T=" << s.t << " Hq=" << s.hq
                                      << " Hkv=" << s.hkv << " D=" << s.d);
    const Inputs in = MakeInputs(s, seed += 10);
    Tensor out = Tensor::Cpu(in.q.shape(), DType::kF32);
    Tensor lse = Tensor::Cpu({s.b, s.hq, s.t}, DType::kF32);
    ASSERT_TRUE(AttentionForward(*ctx, out, lse, in.q, in.k, in.v, in.scale).ok());
    Tensor dq = Tensor::Cpu(in.q.shape(), DType::kF32), dk = Tensor::Cpu(in.k.shape(), DType::kF32),
           dv = Tensor::Cpu(in.k.shape(), DType::kF32);
    ASSERT_TRUE(
        AttentionBackward(*ctx, dq, dk, dv, in.dout, in.q, in.k, in.v, out, lse, in.scale).ok());
    auto got = testing::ChunkedAttention(*ctx, in.q, in.k, in.v, in.dout, in.scale);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_TRUE(AllClose(got->out, out, kF32Tol)) << "out";
    EXPECT_TRUE(AllClose(got->lse, lse, kF32Tol)) << "lse";
    EXPECT_TRUE(AllClose(got->dq, dq, kF32Tol)) << "dq";
    EXPECT_TRUE(AllClose(got->dk, dk, kF32Tol)) << "dk";
    EXPECT_TRUE(AllClose(got->dv, dv, kF32Tol)) << "dv";
  }
}

TEST(AttentionMergeCpuTest, KnownValuesAndEmptyRows) {
  auto ctx = Context::Cpu();
  // B=1, T=3, H=1, D=2. Row 0: both sides present; row 1: acc empty; row 2: block empty.
  Tensor acc = Tensor::Cpu({1, 3, 1, 2}, DType::kF32), blk = Tensor::Cpu({1, 3, 1, 2}, DType::kF32);
  Tensor la = Tensor::Cpu({1, 1, 3}, DType::kF32), lb = Tensor::Cpu({1, 1, 3}, DType::kF32);
  const float a[] = {1, 2, 7, 7, 5, 6}, bv[] = {3, 4, -1, 8, 9, 9};
  const float lav[] = {std::log(1.0f), -INFINITY, 0.5f}, lbv[] = {std::log(3.0f), 1.25f, -INFINITY};
  std::copy_n(a, 6, acc.data<float>());
  std::copy_n(bv, 6, blk.data<float>());
  std::copy_n(lav, 3, la.data<float>());
  std::copy_n(lbv, 3, lb.data<float>());
  ASSERT_TRUE(AttentionMerge(*ctx, acc, la, blk, lb).ok());
  // Row 0: weights 1/4 and 3/4, lse log 4.
  const float want[] = {0.25f * 1 + 0.75f * 3, 0.25f * 2 + 0.75f * 4, -1, 8, 5, 6};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(acc.data<float>()[i], want[i], 1e-6) << i;
  EXPECT_NEAR(la.data<float>()[0], std::log(4.0f), 1e-6);
  EXPECT_EQ(la.data<float>()[1], 1.25f);
  EXPECT_EQ(la.data<float>()[2], 0.5f);
}

TEST(ChunkMajorTest, RoundTripIsExactThroughTokenStrideViews) {
  auto ctx = Context::Cpu();
  // x is a view of heads [1, 3) of a [2, 6, 4, 5] buffer: token stride 20, 2 heads of 5.
  const Tensor buffer = RandomUniform({2, 6, 4, 5}, 3);
  const Tensor x = buffer.Slice(2, 1, 3);
  Tensor chunked = Tensor::Cpu({3, 2, 2, 2, 5}, DType::kF32);  // C=3 chunks of Tc=2
  ASSERT_TRUE(ToChunkMajor(*ctx, chunked, x).ok());
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t t = 0; t < 2; ++t)
        for (int64_t h = 0; h < 2; ++h)
          for (int64_t d = 0; d < 5; ++d) {
            EXPECT_EQ(chunked.data<float>()[(((c * 2 + b) * 2 + t) * 2 + h) * 5 + d],
                      buffer.data<float>()[((b * 6 + c * 2 + t) * 4 + 1 + h) * 5 + d]);
          }
  Tensor back_buffer = Tensor::CpuZeros({2, 6, 4, 5}, DType::kF32);
  Tensor back = back_buffer.Slice(2, 1, 3);
  ASSERT_TRUE(FromChunkMajor(*ctx, back, chunked).ok());
  EXPECT_TRUE(BitwiseEqual(testing::Clone(back), testing::Clone(x)));
  // Heads outside the view stay untouched.
  EXPECT_EQ(back_buffer.data<float>()[0], 0.0f);

  Tensor halves = Tensor::Cpu({2, 2, 3, 2, 5}, DType::kF32);  // 2 chunks of 3 = 6 tokens
  EXPECT_TRUE(ToChunkMajor(*ctx, halves, x).ok());
  Tensor bad = Tensor::Cpu({4, 2, 2, 2, 5}, DType::kF32);  // 8 tokens != 6
  const Status st = ToChunkMajor(*ctx, bad, x);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tensor 'x'"), std::string::npos) << st.message();
}

TEST(AttentionBlockCpuTest, RejectsMismatchedBlocks) {
  auto ctx = Context::Cpu();
  const Tensor q = RandomUniform({1, 4, 2, 8}, 1), k = RandomUniform({1, 5, 2, 8}, 2);
  Tensor out = Tensor::Cpu(q.shape(), DType::kF32), lse = Tensor::Cpu({1, 2, 4}, DType::kF32);
  const Status st = AttentionBlockForward(*ctx, out, lse, q, k, k, 0.5f, AttentionMask::kFull);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("AttentionBlockForward: tensor 'k'"), std::string::npos)
      << st.message();
}

}  // namespace
}  // namespace tandem::ops
