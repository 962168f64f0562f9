// ops::ShardedCrossEntropyPartials / Finish on the CPU: the vocabulary split over R simulated
// ranks (the last with padding columns, one rank possibly holding no real column) gives the
// losses and gradients of the unsplit ops::CrossEntropy; ignored rows give 0; bad arguments are
// refused with messages naming the argument.
#include <algorithm>
#include <string>
#include <vector>

#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

using testing::AllClose;
using testing::RandomInts;
using testing::RandomUniform;

struct Split {
  int64_t rows, ranks, cols, vocab;  // vocab <= ranks * cols
};

void ExpectMatchesUnsplit(const Split& s, uint64_t seed) {
  SCOPED_TRACE(StrCat("rows ", s.rows, " ranks ", s.ranks, " cols ", s.cols, " vocab ", s.vocab));
  auto ctx = Context::Cpu();
  const int64_t n = s.rows;
  Tensor full = RandomUniform({n, s.vocab}, seed, -6.0f, 6.0f);  // [n, V]
  Tensor targets = RandomInts({n}, seed + 1, static_cast<int32_t>(s.vocab));
  if (n > 1) targets.data<int32_t>()[n - 1] = kIgnoreIndex;
  targets.data<int32_t>()[0] = static_cast<int32_t>(s.vocab - 1);  // owned by the last real rank
  Tensor want_losses = Tensor::Cpu({n}, DType::kF32);
  Tensor want_grad = Tensor::Cpu({n, s.vocab}, DType::kF32);
  ASSERT_TRUE(CrossEntropy(*ctx, want_losses, want_grad, full, targets, 0.25f).ok());

  // Rank k holds columns [k * cols, k * cols + valid_k) of `full`, then zero padding.
  std::vector<Tensor> shards;
  Tensor all = Tensor::Cpu({s.ranks, n, 3}, DType::kF32);
  for (int64_t k = 0; k < s.ranks; ++k) {
    Tensor shard = Tensor::CpuZeros({n, s.cols}, DType::kF32);
    const int64_t valid = std::clamp<int64_t>(s.vocab - k * s.cols, 0, s.cols);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < s.cols; ++j) {  // padding holds garbage that must be ignored
        shard.data<float>()[i * s.cols + j] =
            j < valid ? full.data<float>()[i * s.vocab + k * s.cols + j] : 1e4f;
      }
    }
    Tensor part = all.Slice(0, k, k + 1).View({n, 3});
    ASSERT_TRUE(ShardedCrossEntropyPartials(*ctx, part, shard, targets, k * s.cols, valid).ok());
    shards.push_back(shard);
  }
  for (int64_t k = 0; k < s.ranks; ++k) {
    const int64_t valid = std::clamp<int64_t>(s.vocab - k * s.cols, 0, s.cols);
    Tensor losses = Tensor::Cpu({n}, DType::kF32);
    Tensor& grad = shards[k];  // in place
    ASSERT_TRUE(ShardedCrossEntropyFinish(*ctx, losses, grad, grad, all, targets, k * s.cols,
                                          valid, 0.25f)
                    .ok());
    EXPECT_TRUE(AllClose(losses, want_losses, {1e-5, 1e-5})) << "rank " << k;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < s.cols; ++j) {
        const float got = grad.data<float>()[i * s.cols + j];
        const float want = j < valid ? want_grad.data<float>()[i * s.vocab + k * s.cols + j] : 0.f;
        ASSERT_NEAR(got, want, 1e-7 + 1e-5 * std::abs(want)) << "rank " << k << " row " << i
                                                              << " column " << j;
      }
    }
  }
}

TEST(ShardedCrossEntropyTest, EqualsTheUnsplitLossAndGradient) {
  ExpectMatchesUnsplit({1, 1, 37, 37}, 1);
  ExpectMatchesUnsplit({5, 2, 64, 121}, 2);    // 7 padding columns on rank 1
  ExpectMatchesUnsplit({7, 3, 33, 97}, 3);     // 2 padding columns
  ExpectMatchesUnsplit({3, 4, 10, 29}, 4);     // rank 3 holds no real column
  ExpectMatchesUnsplit({9, 2, 1000, 1999}, 5);
}

TEST(ShardedCrossEntropyTest, AllIgnoredRowsGiveZeros) {
  auto ctx = Context::Cpu();
  Tensor logits = RandomUniform({2, 8}, 9);
  Tensor targets = Tensor::Cpu({2}, DType::kI32);
  std::fill_n(targets.data<int32_t>(), 2, kIgnoreIndex);
  Tensor all = Tensor::Cpu({1, 2, 3}, DType::kF32);
  Tensor part = all.View({2, 3});
  ASSERT_TRUE(ShardedCrossEntropyPartials(*ctx, part, logits, targets, 0, 8).ok());
  Tensor losses = Tensor::Cpu({2}, DType::kF32);
  ASSERT_TRUE(ShardedCrossEntropyFinish(*ctx, losses, logits, logits, all, targets, 0, 8, 1.0f).ok());
  for (int i = 0; i < 2; ++i) EXPECT_EQ(losses.data<float>()[i], 0.0f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(logits.data<float>()[i], 0.0f);
}

TEST(ShardedCrossEntropyTest, BadArgumentsAreNamed) {
  auto ctx = Context::Cpu();
  Tensor logits = RandomUniform({2, 8}, 9);
  Tensor targets = RandomInts({2}, 10, 8);
  Tensor part = Tensor::Cpu({2, 3}, DType::kF32);
  Status s = ShardedCrossEntropyPartials(*ctx, part, logits, targets, 0, 9);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("valid must be in [0, Vl=8]"), std::string::npos) << s.ToString();
  Tensor wrong = Tensor::Cpu({2, 2}, DType::kF32);
  s = ShardedCrossEntropyPartials(*ctx, wrong, logits, targets, 0, 8);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("partials"), std::string::npos) << s.ToString();
  targets.data<int32_t>()[1] = -3;
  s = ShardedCrossEntropyPartials(*ctx, part, logits, targets, 0, 8);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("targets[1] = -3"), std::string::npos) << s.ToString();
  Tensor all = Tensor::Cpu({1, 3, 3}, DType::kF32);  // N mismatch
  Tensor losses = Tensor::Cpu({2}, DType::kF32);
  Tensor none;
  targets.data<int32_t>()[1] = 0;
  s = ShardedCrossEntropyFinish(*ctx, losses, none, logits, all, targets, 0, 8, 1.0f);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.ToString().find("all_partials"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace tandem::ops
