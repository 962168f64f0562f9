// Known values and reference checks of the CPU ops: embedding, RMSNorm, RoPE, attention (against
// a naive f64 attention, with and without segment ids), SwiGLU, cross-entropy, AdamW (against a
// hand-unrolled f64 computation), the accumulate/overwrite rules and the elementwise ops.
#include <cmath>
#include <limits>
#include <vector>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::Clone;
using testing::RandomInts;
using testing::RandomUniform;

Tensor FromValues(const Shape& shape, std::vector<float> values) {
  Tensor t = Tensor::Cpu(shape, DType::kF32);
  TANDEM_CHECK(static_cast<int64_t>(values.size()) == t.numel());
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

Tensor Ints(std::vector<int32_t> values) {
  Tensor t = Tensor::Cpu({static_cast<int64_t>(values.size())}, DType::kI32);
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

TEST(EmbeddingCpuTest, ForwardGathersAndBackwardSumsRepeatedIds) {
  auto ctx = Context::Cpu();
  Tensor table = RandomUniform({4, 3}, 1);
  Tensor ids = Ints({2, 0, 2, 3, 2});
  Tensor out = Tensor::Cpu({5, 3}, DType::kF32);
  ASSERT_TRUE(EmbeddingForward(*ctx, out, ids, table).ok());
  for (int n = 0; n < 5; ++n) {
    for (int c = 0; c < 3; ++c) {
      EXPECT_EQ(out.data<float>()[n * 3 + c], table.data<float>()[ids.data<int32_t>()[n] * 3 + c]);
    }
  }
  Tensor dout = RandomUniform({5, 3}, 2);
  Tensor init = RandomUniform({4, 3}, 3);
  Tensor dtable = Clone(init);
  ASSERT_TRUE(EmbeddingBackward(*ctx, dtable, dout, ids).ok());
  const float* d = dout.data<float>();
  for (int c = 0; c < 3; ++c) {
    // The documented order: sum over tokens in increasing n, then one add into dtable.
    const float sum2 = (d[0 * 3 + c] + d[2 * 3 + c]) + d[4 * 3 + c];
    EXPECT_EQ(dtable.data<float>()[2 * 3 + c], init.data<float>()[2 * 3 + c] + sum2);
    EXPECT_EQ(dtable.data<float>()[0 * 3 + c], init.data<float>()[0 * 3 + c] + d[1 * 3 + c]);
    EXPECT_EQ(dtable.data<float>()[1 * 3 + c], init.data<float>()[1 * 3 + c]);  // unused id
    EXPECT_EQ(dtable.data<float>()[3 * 3 + c], init.data<float>()[3 * 3 + c] + d[3 * 3 + c]);
  }
  Tensor frozen;  // undefined: no gradient wanted
  EXPECT_TRUE(EmbeddingBackward(*ctx, frozen, dout, ids).ok());
}

// AddRmsNormForward: the values of Add then RmsNormForward, into a new sum or in place over a;
// a shape mismatch is named.
TEST(RmsNormCpuTest, FusedAddAndNormEqualsTheTwoOps) {
  auto ctx = Context::Cpu();
  const Tensor a = RandomUniform({7, 13}, 31), b = RandomUniform({7, 13}, 32);
  const Tensor w = RandomUniform({13}, 33, 0.5f, 1.5f);
  Tensor sum = Tensor::Cpu({7, 13}, DType::kF32), want_y = Tensor::Cpu({7, 13}, DType::kF32);
  Tensor no_rstd;
  ASSERT_TRUE(Add(*ctx, sum, a, b).ok());
  ASSERT_TRUE(RmsNormForward(*ctx, want_y, no_rstd, sum, w, 1e-5f).ok());
  Tensor got_sum = Tensor::Cpu({7, 13}, DType::kF32), got_y = Tensor::Cpu({7, 13}, DType::kF32);
  ASSERT_TRUE(AddRmsNormForward(*ctx, got_sum, got_y, a, b, w, 1e-5f).ok());
  EXPECT_TRUE(AllClose(got_sum, sum, {0, 0}));
  EXPECT_TRUE(AllClose(got_y, want_y, {0, 0}));
  Tensor in_place = Clone(a), y2 = Tensor::Cpu({7, 13}, DType::kF32);
  ASSERT_TRUE(AddRmsNormForward(*ctx, in_place, y2, in_place, b, w, 1e-5f).ok());
  EXPECT_TRUE(AllClose(in_place, sum, {0, 0}));
  EXPECT_TRUE(AllClose(y2, want_y, {0, 0}));
  Tensor short_b = RandomUniform({6, 13}, 34);
  const Status bad = AddRmsNormForward(*ctx, got_sum, got_y, a, short_b, w, 1e-5f);
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.ToString().find("'b'"), std::string::npos) << bad.ToString();
}

TEST(RmsNormCpuTest, KnownValuesAndAccumulateRules) {
  auto ctx = Context::Cpu();
  Tensor x = FromValues({2, 4}, {1, 2, 3, 4, -2, 0, 0, 0});
  Tensor w = FromValues({4}, {1, 1, 2, 0.5f});
  Tensor y = Tensor::Cpu({2, 4}, DType::kF32), rstd = Tensor::Cpu({2}, DType::kF32);
  ASSERT_TRUE(RmsNormForward(*ctx, y, rstd, x, w, 0.0f).ok());
  const double r0 = 1.0 / std::sqrt(7.5), r1 = 1.0;  // mean squares 30/4 and 4/4
  EXPECT_TRUE(AllClose(rstd, FromValues({2}, {float(r0), float(r1)}), {0, 1e-6}));
  EXPECT_TRUE(AllClose(
      y, FromValues({2, 4}, {float(r0), float(2 * r0), float(6 * r0), float(2 * r0), -2, 0, 0, 0}),
      {0, 1e-6}));
  // accumulate_dx adds to dx; dw always adds.
  Tensor big_x = RandomUniform({17, 5}, 4), big_w = RandomUniform({5}, 5),
         dy = RandomUniform({17, 5}, 6);
  Tensor big_y = Tensor::Cpu({17, 5}, DType::kF32), big_rstd = Tensor::Cpu({17}, DType::kF32);
  ASSERT_TRUE(RmsNormForward(*ctx, big_y, big_rstd, big_x, big_w, 1e-5f).ok());
  Tensor dx = Tensor::Cpu({17, 5}, DType::kF32), dw = Tensor::CpuZeros({5}, DType::kF32);
  ASSERT_TRUE(RmsNormBackward(*ctx, dx, dw, dy, big_x, big_w, big_rstd, false).ok());
  Tensor dx_init = RandomUniform({17, 5}, 7), dw_init = RandomUniform({5}, 8);
  Tensor dx_acc = Clone(dx_init), dw_acc = Clone(dw_init);
  ASSERT_TRUE(RmsNormBackward(*ctx, dx_acc, dw_acc, dy, big_x, big_w, big_rstd, true).ok());
  for (int64_t i = 0; i < dx.numel(); ++i) {
    EXPECT_EQ(dx_acc.data<float>()[i], dx_init.data<float>()[i] + dx.data<float>()[i]);
  }
  for (int64_t i = 0; i < dw.numel(); ++i) {
    EXPECT_EQ(dw_acc.data<float>()[i], dw_init.data<float>()[i] + dw.data<float>()[i]);
  }
}

TEST(RopeCpuTest, RotatesPairsAndRunsInPlaceOnStridedViews) {
  auto ctx = Context::Cpu();
  // D = 4: pairs (0, 2) and (1, 3); inv_freq pi/2 and 0, position 1: the first pair turns 90 deg.
  Tensor x = FromValues({2, 1, 4}, {1, 2, 3, 4, 1, 2, 3, 4});
  Tensor inv_freq = FromValues({2}, {float(M_PI / 2), 0.0f});
  Tensor pos = Ints({0, 1});
  Tensor y = Tensor::Cpu({2, 1, 4}, DType::kF32);
  ASSERT_TRUE(Rope(*ctx, y, x, pos, inv_freq, false).ok());
  EXPECT_TRUE(AllClose(y, FromValues({2, 1, 4}, {1, 2, 3, 4, -3, 2, 1, 4}), {1e-6, 0}));
  // In place on a token-strided view (q of a fused qkv buffer), forward then inverse: identity.
  Tensor qkv = RandomUniform({17, 3 * 3, 8}, 9);  // [N, (Hq + 2 Hkv), D] with Hq = 3, Hkv = 3
  Tensor original = Clone(qkv);
  Tensor q = qkv.Slice(1, 0, 3);
  Tensor positions = RandomInts({17}, 10, 300), freqs = testing::InvFreq(8);
  ASSERT_TRUE(Rope(*ctx, q, q, positions, freqs, false).ok());
  EXPECT_FALSE(AllClose(qkv, original, {1e-3, 0}));
  ASSERT_TRUE(Rope(*ctx, q, q, positions, freqs, true).ok());
  EXPECT_TRUE(AllClose(qkv, original, {1e-5, 1e-5}));  // k, v untouched; q restored
}

TEST(SwigluCpuTest, KnownValues) {
  auto ctx = Context::Cpu();
  Tensor gate = FromValues({1, 4}, {0, 1, -1, 30}), up = FromValues({1, 4}, {5, 2, 2, 0.5f});
  Tensor out = Tensor::Cpu({1, 4}, DType::kF32);
  ASSERT_TRUE(SwigluForward(*ctx, out, gate, up).ok());
  const double s1 = 1.0 / (1.0 + std::exp(-1.0));
  EXPECT_TRUE(
      AllClose(out, FromValues({1, 4}, {0, float(2 * s1), float(-2 * (1 - s1)), 15}), {0, 1e-6}));
}

TEST(CrossEntropyCpuTest, UniformLogitsIgnoreIndexAndInPlace) {
  auto ctx = Context::Cpu();
  const int64_t v = 1000;
  Tensor logits = Tensor::Cpu({3, v}, DType::kF32);
  for (int64_t i = 0; i < logits.numel(); ++i) logits.data<float>()[i] = 7.0f;  // uniform rows
  Tensor targets = Ints({5, kIgnoreIndex, 999});
  Tensor losses = Tensor::Cpu({3}, DType::kF32);
  Tensor dlogits = logits;  // in place
  ASSERT_TRUE(CrossEntropy(*ctx, losses, dlogits, logits, targets, 2.0f).ok());
  const float log_v = static_cast<float>(std::log(1000.0));
  EXPECT_TRUE(AllClose(losses, FromValues({3}, {log_v, 0, log_v}), {0, 1e-6}));
  const float* d = dlogits.data<float>();
  for (int64_t j = 0; j < v; ++j) {
    EXPECT_NEAR(d[j], 2.0 * (1e-3 - (j == 5)), 1e-7);
    EXPECT_EQ(d[v + j], 0.0f);  // ignored row
    EXPECT_NEAR(d[2 * v + j], 2.0 * (1e-3 - (j == 999)), 1e-7);
  }
  // Large logits stay finite (max subtraction).
  Tensor big = FromValues({1, 3}, {1000, 0, -1000});
  Tensor big_loss = Tensor::Cpu({1}, DType::kF32), no_grad;
  ASSERT_TRUE(CrossEntropy(*ctx, big_loss, no_grad, big, Ints({1}), 1.0f).ok());
  EXPECT_NEAR(big_loss.data<float>()[0], 1000.0, 1e-3);
}

// The f64 reference of one AdamW element over several steps, PyTorch's formulas.
TEST(AdamWCpuTest, ThreeStepsMatchHandUnrolledF64) {
  auto ctx = Context::Cpu();
  const int64_t n = 37;
  Tensor master = RandomUniform({n}, 11),
         grads[3] = {RandomUniform({n}, 12), RandomUniform({n}, 13), RandomUniform({n}, 14)};
  Tensor m = Tensor::CpuZeros({n}, DType::kF32), v = Tensor::CpuZeros({n}, DType::kF32);
  Tensor weights = Tensor::Cpu({n}, DType::kBF16);
  AdamWParams p;
  p.lr = 1e-2f;
  p.beta1 = 0.9f;
  p.beta2 = 0.95f;
  p.eps = 1e-6f;
  p.weight_decay = 0.1f;
  p.grad_scale = 0.5f;
  std::vector<double> rp(n), rm(n, 0.0), rv(n, 0.0);
  for (int64_t i = 0; i < n; ++i) rp[i] = master.data<float>()[i];
  for (int step = 1; step <= 3; ++step) {
    p.step = step;
    ASSERT_TRUE(AdamW(*ctx, master, m, v, weights, grads[step - 1], p).ok());
    const double b1 = p.beta1, b2 = p.beta2, lr = p.lr;
    for (int64_t i = 0; i < n; ++i) {
      const double g = static_cast<double>(grads[step - 1].data<float>()[i]) * p.grad_scale;
      rp[i] *= 1.0 - lr * p.weight_decay;
      rm[i] = rm[i] + (1.0 - b1) * (g - rm[i]);
      rv[i] = rv[i] * b2 + (1.0 - b2) * g * g;
      const double denom = std::sqrt(rv[i]) / std::sqrt(1.0 - std::pow(b2, step)) + p.eps;
      rp[i] -= lr / (1.0 - std::pow(b1, step)) * rm[i] / denom;
    }
  }
  Tensor expected = Tensor::Cpu({n}, DType::kF32), expected_m = Tensor::Cpu({n}, DType::kF32);
  for (int64_t i = 0; i < n; ++i) {
    expected.data<float>()[i] = static_cast<float>(rp[i]);
    expected_m.data<float>()[i] = static_cast<float>(rm[i]);
  }
  // f32 arithmetic over 3 steps: a few ulps of the parameters, relative 1e-5 on moments.
  EXPECT_TRUE(AllClose(master, expected, {1e-6, 1e-6}));
  EXPECT_TRUE(AllClose(m, expected_m, {1e-7, 1e-5}));
  // model_weights receives master rounded to bf16.
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(weights.data<Bf16>()[i].bits, FloatToBf16(master.data<float>()[i]).bits);
  }
}

TEST(ElementwiseCpuTest, SumSquaresAddCastFillScale) {
  auto ctx = Context::Cpu();
  Tensor x = FromValues({3}, {1, 2, 3});
  Tensor out = FromValues({1}, {1});
  ASSERT_TRUE(SumSquares(*ctx, out, x).ok());
  EXPECT_EQ(out.data<float>()[0], 15.0f);  // accumulates: 1 + 14
  Tensor big = RandomUniform({100003}, 15);
  Tensor big_bf16 = *CastCpu(big, DType::kBF16);
  Tensor s32 = FromValues({1}, {0}), s16 = FromValues({1}, {0});
  ASSERT_TRUE(SumSquares(*ctx, s32, big).ok());
  ASSERT_TRUE(SumSquares(*ctx, s16, big_bf16).ok());
  double ref = 0.0;
  for (int64_t i = 0; i < big.numel(); ++i)
    ref += double(big.data<float>()[i]) * big.data<float>()[i];
  EXPECT_NEAR(s32.data<float>()[0], ref, ref * 1e-6);
  EXPECT_NEAR(s16.data<float>()[0], ref, ref * 1e-2);  // bf16-rounded inputs

  Tensor a = RandomUniform({3, 5}, 16), b = RandomUniform({3, 5}, 17);
  Tensor sum = Tensor::Cpu({3, 5}, DType::kF32);
  ASSERT_TRUE(Add(*ctx, sum, a, b).ok());
  for (int64_t i = 0; i < 15; ++i)
    EXPECT_EQ(sum.data<float>()[i], a.data<float>()[i] + b.data<float>()[i]);
  ASSERT_TRUE(Add(*ctx, a, a, b).ok());  // out aliases a
  EXPECT_TRUE(testing::BitwiseEqual(a, sum));

  Tensor h = Tensor::Cpu({3, 5}, DType::kBF16), back = Tensor::Cpu({3, 5}, DType::kF32);
  ASSERT_TRUE(Cast(*ctx, h, b).ok());
  ASSERT_TRUE(Cast(*ctx, back, h).ok());
  for (int64_t i = 0; i < 15; ++i)
    EXPECT_EQ(back.data<float>()[i], RoundToBf16(b.data<float>()[i]));
  Tensor f16 = Tensor::Cpu({3, 5}, DType::kF16);
  ASSERT_TRUE(Cast(*ctx, f16, b).ok());
  for (int64_t i = 0; i < 15; ++i)
    EXPECT_EQ(f16.data<F16>()[i].bits, FloatToF16(b.data<float>()[i]).bits);

  Tensor ints = Tensor::Cpu({4}, DType::kI32);
  ASSERT_TRUE(Fill(*ctx, ints, 7.0f).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ints.data<int32_t>()[i], 7);
  ASSERT_TRUE(Fill(*ctx, b, -1.5f).ok());
  ASSERT_TRUE(Scale(*ctx, b, 3.0f).ok());
  for (int64_t i = 0; i < 15; ++i) EXPECT_EQ(b.data<float>()[i], -4.5f);
}

TEST(ElementwiseCpuTest, CopyMatrixCopiesColumnBlocksAndChecksShapes) {
  auto ctx = Context::Cpu();
  Tensor src = RandomUniform({4, 6}, 18), dst = FromValues({3, 5}, std::vector<float>(15, -1.0f));
  Tensor to = dst.Slice(1, 1, 4);  // [3, 3], row stride 5
  ASSERT_TRUE(CopyMatrix(*ctx, to, src.Slice(0, 1, 4).Slice(1, 2, 5)).ok());
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t c = 0; c < 5; ++c) {
      const float want = c >= 1 && c < 4 ? src.data<float>()[(r + 1) * 6 + c + 1] : -1.0f;
      EXPECT_EQ(dst.data<float>()[r * 5 + c], want) << r << ", " << c;
    }
  }
  Tensor two = FromValues({2, 4}, std::vector<float>(8, 0.0f));
  std::vector<Tensor> dsts = {two.Slice(1, 0, 1), two.Slice(1, 2, 4)};
  const std::vector<Tensor> srcs = {src.Slice(0, 0, 2).Slice(1, 5, 6),
                                    src.Slice(0, 2, 4).Slice(1, 0, 2)};
  ASSERT_TRUE(CopyMatrices(*ctx, dsts, srcs).ok());
  const float* t = two.data<float>();
  const float* sv = src.data<float>();
  EXPECT_EQ(t[0], sv[5]);
  EXPECT_EQ(t[4], sv[11]);
  EXPECT_EQ(t[1], 0.0f);
  EXPECT_EQ(t[2], sv[12]);
  EXPECT_EQ(t[3], sv[13]);
  EXPECT_EQ(t[7], sv[19]);
  std::vector<Tensor> one = {dsts[0]};
  EXPECT_FALSE(CopyMatrices(*ctx, one, srcs).ok());
  Tensor wrong = dst.Slice(1, 0, 2);
  const Status s = CopyMatrix(*ctx, wrong, src.Slice(0, 0, 3).Slice(1, 0, 3));
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("CopyMatrix"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tandem::ops
