// The CPU ops are bitwise deterministic: two runs agree, and 1 and 2 OpenMP threads agree. Sizes
// are large enough that every kernel actually splits its work across threads.
#include <omp.h>

#include <functional>
#include <vector>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::BitwiseEqual;
using testing::Clone;
using testing::RandomInts;
using testing::RandomUniform;

// Runs `op` (which fills the returned tensors from fixed inputs) with 1 thread, then twice with 2
// threads, and expects identical bytes every time.
void ExpectDeterministic(const std::function<std::vector<Tensor>()>& op) {
  omp_set_num_threads(1);
  const std::vector<Tensor> first = op();
  omp_set_num_threads(2);
  for (int run = 0; run < 2; ++run) {
    const std::vector<Tensor> again = op();
    ASSERT_EQ(again.size(), first.size());
    for (size_t i = 0; i < first.size(); ++i) {
      EXPECT_TRUE(BitwiseEqual(again[i], first[i])) << "output " << i << ", run " << run;
    }
  }
}

TEST(DeterminismTest, EmbeddingBackwardWithRepeatedIds) {
  auto ctx = Context::Cpu();
  Tensor ids = RandomInts({999}, 1, 50), dout = RandomUniform({999, 64}, 2);
  Tensor init = RandomUniform({50, 64}, 3);
  ExpectDeterministic([&] {
    Tensor dtable = Clone(init);
    TANDEM_CHECK_OK(EmbeddingBackward(*ctx, dtable, dout, ids));
    return std::vector<Tensor>{dtable};
  });
}

TEST(DeterminismTest, RmsNormForwardAndBackward) {
  auto ctx = Context::Cpu();
  Tensor x = RandomUniform({127, 200}, 4), w = RandomUniform({200}, 5),
         dy = RandomUniform({127, 200}, 6);
  ExpectDeterministic([&] {
    Tensor y = Tensor::Cpu({127, 200}, DType::kF32), rstd = Tensor::Cpu({127}, DType::kF32);
    Tensor dx = Tensor::Cpu({127, 200}, DType::kF32), dw = Tensor::CpuZeros({200}, DType::kF32);
    TANDEM_CHECK_OK(RmsNormForward(*ctx, y, rstd, x, w, 1e-5f));
    TANDEM_CHECK_OK(RmsNormBackward(*ctx, dx, dw, dy, x, w, rstd, false));
    return std::vector<Tensor>{y, rstd, dx, dw};
  });
}

TEST(DeterminismTest, AttentionForwardAndBackward) {
  auto ctx = Context::Cpu();
  const int64_t B = 2, T = 67, Hq = 6, Hkv = 2, D = 16;
  Tensor q = RandomUniform({B, T, Hq, D}, 7), k = RandomUniform({B, T, Hkv, D}, 8);
  Tensor v = RandomUniform({B, T, Hkv, D}, 9), dout = RandomUniform({B, T, Hq, D}, 10);
  Tensor seg = RandomInts({B, T}, 11, 2);
  ExpectDeterministic([&] {
    Tensor out = Tensor::Cpu(q.shape(), DType::kF32), lse = Tensor::Cpu({B, Hq, T}, DType::kF32);
    Tensor dq = Tensor::Cpu(q.shape(), DType::kF32), dk = Tensor::Cpu(k.shape(), DType::kF32);
    Tensor dv = Tensor::Cpu(v.shape(), DType::kF32);
    TANDEM_CHECK_OK(AttentionForward(*ctx, out, lse, q, k, v, 0.25f, seg));
    TANDEM_CHECK_OK(AttentionBackward(*ctx, dq, dk, dv, dout, q, k, v, out, lse, 0.25f, seg));
    return std::vector<Tensor>{out, lse, dq, dk, dv};
  });
}

TEST(DeterminismTest, RopeSwigluCrossEntropy) {
  auto ctx = Context::Cpu();
  Tensor x = RandomUniform({300, 4, 64}, 12), pos = RandomInts({300}, 13, 4096);
  Tensor inv_freq = testing::InvFreq(64);
  Tensor gate = RandomUniform({127, 300}, 14), up = RandomUniform({127, 300}, 15);
  Tensor logits = RandomUniform({64, 1001}, 16, -5.0f, 5.0f), targets = RandomInts({64}, 17, 1001);
  ExpectDeterministic([&] {
    Tensor y = Tensor::Cpu(x.shape(), DType::kF32);
    TANDEM_CHECK_OK(Rope(*ctx, y, x, pos, inv_freq, false));
    Tensor out = Tensor::Cpu(gate.shape(), DType::kF32),
           dg = Tensor::Cpu(gate.shape(), DType::kF32);
    Tensor du = Tensor::Cpu(gate.shape(), DType::kF32);
    TANDEM_CHECK_OK(SwigluForward(*ctx, out, gate, up));
    TANDEM_CHECK_OK(SwigluBackward(*ctx, dg, du, out, gate, up));
    Tensor losses = Tensor::Cpu({64}, DType::kF32),
           dlogits = Tensor::Cpu(logits.shape(), DType::kF32);
    TANDEM_CHECK_OK(CrossEntropy(*ctx, losses, dlogits, logits, targets, 0.5f));
    return std::vector<Tensor>{y, out, dg, du, losses, dlogits};
  });
}

TEST(DeterminismTest, SumSquaresAdamWAndMatmul) {
  auto ctx = Context::Cpu();
  Tensor x = RandomUniform({300001}, 18), grad = RandomUniform({300001}, 19);
  Tensor a = RandomUniform({200, 96}, 20), b = RandomUniform({1000, 96}, 21);
  ExpectDeterministic([&] {
    Tensor sum = Tensor::CpuZeros({1}, DType::kF32);
    TANDEM_CHECK_OK(SumSquares(*ctx, sum, x));
    Tensor master = Clone(x), m = Tensor::CpuZeros(x.shape(), DType::kF32);
    Tensor v = Tensor::CpuZeros(x.shape(), DType::kF32), none;
    TANDEM_CHECK_OK(AdamW(*ctx, master, m, v, none, grad, AdamWParams{}));
    Tensor c = Tensor::Cpu({200, 1000}, DType::kF32);
    TANDEM_CHECK_OK(Matmul(*ctx, c, a, b, false, true));
    return std::vector<Tensor>{sum, master, m, v, c};
  });
}

}  // namespace
}  // namespace tandem::ops
