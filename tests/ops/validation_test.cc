// Every op rejects a wrong shape, dtype, device or layout with InvalidArgument naming the op and
// the tensor, before touching any data.
#include <string>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::RandomInts;
using testing::RandomUniform;

// Expects InvalidArgument whose message contains every fragment.
::testing::AssertionResult Rejected(const Status& s, std::initializer_list<const char*> fragments) {
  if (s.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected INVALID_ARGUMENT, got " << s.ToString();
  }
  for (const char* f : fragments) {
    if (s.message().find(f) == std::string::npos) {
      return ::testing::AssertionFailure() << "'" << f << "' missing from: " << s.message();
    }
  }
  return ::testing::AssertionSuccess();
}

// A tensor that claims to live on cuda:0 (never dereferenced: validation must stop first).
Tensor FakeCuda(const Shape& shape, DType dtype) {
  static float dummy[1];
  return Tensor::Wrap(dummy, shape, dtype, Device::Cuda(0));
}

class ValidationTest : public ::testing::Test {
 protected:
  std::unique_ptr<Context> ctx_ = Context::Cpu();
};

TEST_F(ValidationTest, Matmul) {
  Tensor a = RandomUniform({3, 5}, 1), b = RandomUniform({6, 7}, 2);
  Tensor c = Tensor::Cpu({3, 7}, DType::kF32);
  EXPECT_TRUE(Rejected(Matmul(*ctx_, c, a, b, false, false),
                       {"Matmul: tensor 'b': expected shape [K=5, N=7], found [6, 7]"}));
  Tensor bt = RandomUniform({6, 5}, 5);  // trans_b: b is [N, K], so N = 6
  EXPECT_TRUE(Rejected(Matmul(*ctx_, c, a, bt, false, true),
                       {"tensor 'c': expected shape [M=3, N=6], found [3, 7]"}));
  Tensor b16 = *CastCpu(RandomUniform({5, 7}, 3), DType::kBF16);
  EXPECT_TRUE(Rejected(Matmul(*ctx_, c, a, b16, false, false),
                       {"tensor 'b'", "expected dtype f32 on cpu, found bf16"}));
  EXPECT_TRUE(Rejected(Matmul(*ctx_, c, FakeCuda({3, 5}, DType::kF32), b, false, false),
                       {"tensor 'a': expected device cpu, found cuda:0"}));
  // Row views (row stride > cols) are accepted.
  Tensor wide_b = RandomUniform({5, 10}, 4).Slice(1, 2, 9);
  EXPECT_TRUE(Matmul(*ctx_, c, a, wide_b, false, false).ok());
}

TEST_F(ValidationTest, Embedding) {
  Tensor table = RandomUniform({10, 4}, 1), out = Tensor::Cpu({3, 4}, DType::kF32);
  Tensor float_ids = RandomUniform({3}, 2);
  EXPECT_TRUE(Rejected(EmbeddingForward(*ctx_, out, float_ids, table),
                       {"EmbeddingForward: tensor 'ids': expected dtype i32"}));
  Tensor ids = RandomInts({3}, 3, 10);
  ids.data<int32_t>()[1] = 10;
  EXPECT_TRUE(Rejected(EmbeddingForward(*ctx_, out, ids, table),
                       {"tensor 'ids'", "ids[1] = 10", "[0, V=10)"}));
  ids.data<int32_t>()[1] = -1;
  Tensor dtable = Tensor::CpuZeros({10, 4}, DType::kF32), dout = RandomUniform({3, 4}, 4);
  EXPECT_TRUE(Rejected(EmbeddingBackward(*ctx_, dtable, dout, ids), {"ids[1] = -1"}));
  Tensor wrong_width = Tensor::CpuZeros({10, 5}, DType::kF32);
  ids.data<int32_t>()[1] = 2;
  EXPECT_TRUE(
      Rejected(EmbeddingBackward(*ctx_, wrong_width, dout, ids),
               {"EmbeddingBackward: tensor 'dtable': expected shape [V=10, C=4], found [10, 5]"}));
}

TEST_F(ValidationTest, RmsNorm) {
  Tensor x = RandomUniform({17, 96}, 1), w = RandomUniform({95}, 2);
  Tensor y = Tensor::Cpu({17, 96}, DType::kF32), rstd = Tensor::Cpu({17}, DType::kF32);
  EXPECT_TRUE(Rejected(RmsNormForward(*ctx_, y, rstd, x, w, 1e-5f),
                       {"RmsNormForward: tensor 'w': expected shape [C=96], found [95]"}));
  Tensor good_w = RandomUniform({96}, 3), dx = Tensor::Cpu({17, 96}, DType::kF32), no_rstd, dw;
  EXPECT_TRUE(Rejected(RmsNormBackward(*ctx_, dx, dw, x, x, good_w, no_rstd, false),
                       {"RmsNormBackward: tensor 'rstd' is undefined"}));
  Tensor f64_like = Tensor::Cpu({96}, DType::kI32);
  EXPECT_TRUE(Rejected(RmsNormBackward(*ctx_, dx, f64_like, x, x, good_w, rstd, false),
                       {"tensor 'dw'", "expected dtype f32"}));
}

TEST_F(ValidationTest, Rope) {
  Tensor x = RandomUniform({3, 2, 5}, 1), y = Tensor::Cpu({3, 2, 5}, DType::kF32);
  Tensor pos = RandomInts({3}, 2, 10), inv_freq = RandomUniform({2}, 3);
  EXPECT_TRUE(Rejected(Rope(*ctx_, y, x, pos, inv_freq, false),
                       {"Rope: tensor 'x': head dim D must be even"}));
  // Heads must be packed: a view that cuts the head dim is rejected.
  Tensor wide = RandomUniform({3, 2, 8}, 4);
  Tensor cut = wide.Slice(2, 0, 4), y4 = Tensor::Cpu({3, 2, 4}, DType::kF32);
  EXPECT_TRUE(
      Rejected(Rope(*ctx_, y4, cut, pos, inv_freq, false), {"tensor 'x'", "strides [16, 8, 1]"}));
}

TEST_F(ValidationTest, Attention) {
  const int64_t B = 1, T = 4, D = 8;
  Tensor q = RandomUniform({B, T, 3, D}, 1), k = RandomUniform({B, T, 2, D}, 2),
         v = RandomUniform({B, T, 2, D}, 3);
  Tensor out = Tensor::Cpu({B, T, 3, D}, DType::kF32), lse = Tensor::Cpu({B, 3, T}, DType::kF32);
  EXPECT_TRUE(
      Rejected(AttentionForward(*ctx_, out, lse, q, k, v, 0.3f),
               {"AttentionForward: query heads Hq=3 must be a multiple of kv heads Hkv=2"}));
  Tensor k1 = RandomUniform({B, T, 1, D}, 4), v_cuda = FakeCuda({B, T, 1, D}, DType::kF32);
  EXPECT_TRUE(Rejected(AttentionForward(*ctx_, out, lse, q, k1, v_cuda, 0.3f),
                       {"tensor 'v': expected device cpu, found cuda:0"}));
  Tensor v1 = RandomUniform({B, T, 1, D}, 5), bad_lse = Tensor::Cpu({B, T, 3}, DType::kF32);
  EXPECT_TRUE(Rejected(AttentionForward(*ctx_, out, bad_lse, q, k1, v1, 0.3f),
                       {"tensor 'lse': expected shape [B=1, Hq=3, T=4], found [1, 4, 3]"}));
  ASSERT_TRUE(AttentionForward(*ctx_, out, lse, q, k1, v1, 0.3f).ok());
  Tensor dq = Tensor::Cpu(q.shape(), DType::kF32), dv = Tensor::Cpu(v1.shape(), DType::kF32);
  Tensor dk_wrong = Tensor::Cpu({B, T, 3, D}, DType::kF32);
  EXPECT_TRUE(Rejected(AttentionBackward(*ctx_, dq, dk_wrong, dv, out, q, k1, v1, out, lse, 0.3f),
                       {"AttentionBackward: tensor 'dk': expected shape [B=1, T=4, Hkv=1, D=8]"}));
  Tensor seg = RandomInts({B, T + 1}, 6, 2);
  EXPECT_TRUE(Rejected(AttentionForward(*ctx_, out, lse, q, k1, v1, 0.3f, seg),
                       {"tensor 'segment_ids': expected shape [B=1, T=4], found [1, 5]"}));
}

TEST_F(ValidationTest, Swiglu) {
  Tensor gate = RandomUniform({3, 5}, 1), up = RandomUniform({3, 6}, 2),
         out = Tensor::Cpu({3, 5}, DType::kF32);
  EXPECT_TRUE(Rejected(SwigluForward(*ctx_, out, gate, up),
                       {"SwigluForward: tensor 'up': expected shape [N=3, F=5], found [3, 6]"}));
  Tensor dgate = Tensor::Cpu({3, 5}, DType::kF32), dup = Tensor::Cpu({3, 5}, DType::kBF16);
  EXPECT_TRUE(Rejected(SwigluBackward(*ctx_, dgate, dup, gate, gate, gate),
                       {"SwigluBackward: tensor 'dup': expected dtype f32"}));
  // Views into a fused gate|up projection are accepted.
  Tensor fused = RandomUniform({3, 10}, 3);
  Tensor g = fused.Slice(1, 0, 5), u = fused.Slice(1, 5, 10);
  EXPECT_TRUE(SwigluForward(*ctx_, out, g, u).ok());
}

TEST_F(ValidationTest, CrossEntropy) {
  Tensor logits = RandomUniform({3, 7}, 1), losses = Tensor::Cpu({3}, DType::kF32), dlogits;
  Tensor targets = RandomInts({3}, 2, 7);
  targets.data<int32_t>()[2] = 7;
  EXPECT_TRUE(Rejected(CrossEntropy(*ctx_, losses, dlogits, logits, targets, 1.0f),
                       {"CrossEntropy: tensor 'targets': targets[2] = 7"}));
  targets.data<int32_t>()[2] = kIgnoreIndex;
  EXPECT_TRUE(CrossEntropy(*ctx_, losses, dlogits, logits, targets, 1.0f).ok());
  Tensor wide = RandomUniform({3, 9}, 3).Slice(1, 0, 7);  // logits must be contiguous
  EXPECT_TRUE(Rejected(CrossEntropy(*ctx_, losses, dlogits, wide, targets, 1.0f),
                       {"tensor 'logits': expected a contiguous tensor"}));
}

TEST_F(ValidationTest, AdamW) {
  Tensor master = RandomUniform({4, 5}, 1), m = Tensor::CpuZeros({20}, DType::kF32);
  Tensor v = Tensor::CpuZeros({21}, DType::kF32), grad = RandomUniform({20}, 2), none;
  EXPECT_TRUE(Rejected(AdamW(*ctx_, master, m, v, none, grad, AdamWParams{}),
                       {"AdamW: tensor 'v': expected numel 20", "found shape [21]"}));
  Tensor v_ok = Tensor::CpuZeros({20}, DType::kF32), weights_i32 = Tensor::Cpu({20}, DType::kI32);
  EXPECT_TRUE(Rejected(AdamW(*ctx_, master, m, v_ok, weights_i32, grad, AdamWParams{}),
                       {"tensor 'model_weights': expected dtype f32 or bf16"}));
  AdamWParams zero_step;
  zero_step.step = 0;
  EXPECT_TRUE(
      Rejected(AdamW(*ctx_, master, m, v_ok, none, grad, zero_step), {"params.step is 1-based"}));
}

TEST_F(ValidationTest, Elementwise) {
  Tensor x = RandomUniform({3, 4}, 1), out = Tensor::CpuZeros({2}, DType::kF32);
  EXPECT_TRUE(Rejected(SumSquares(*ctx_, out, x),
                       {"SumSquares: tensor 'out': expected shape [1=1], found [2]"}));
  Tensor b = RandomUniform({4, 3}, 2), sum = Tensor::Cpu({3, 4}, DType::kF32);
  EXPECT_TRUE(Rejected(Add(*ctx_, sum, x, b),
                       {"Add: tensor 'b': expected shape [3, 4] (as 'a'), found [4, 3]"}));
  Tensor ints = Tensor::Cpu({3, 4}, DType::kI32);
  EXPECT_TRUE(
      Rejected(Cast(*ctx_, ints, x), {"Cast: tensor 'out': expected dtype f32 or bf16 or f16"}));
  Tensor on_gpu = FakeCuda({3}, DType::kF32);
  EXPECT_TRUE(Rejected(Fill(*ctx_, on_gpu, 1.0f),
                       {"Fill: tensor 'out': expected device cpu, found cuda:0"}));
  Tensor view = RandomUniform({3, 8}, 3).Slice(1, 0, 4);
  EXPECT_TRUE(
      Rejected(Scale(*ctx_, view, 2.0f), {"Scale: tensor 'x': expected a contiguous tensor"}));
}

}  // namespace
}  // namespace tandem::ops
