// ops::LoraDropoutAt (ops/lora.h), CPU: a block of rows (any order, via row ids) and columns of a
// larger batch gets exactly (bitwise) the mask of the whole batch's LoraDropout, plain and
// accumulating; without row ids and offset it is LoraDropout; bad arguments are errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "ops/context.h"
#include "ops/lora.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

using ::tandem::testing::AllClose;
using ::tandem::testing::RandomUniform;

constexpr int64_t kRows = 24, kCols = 37;
constexpr uint64_t kSeed = 91;
constexpr float kP = 0.3f;

// Rows `rows` and columns [col0, col0 + cols) of `whole` [kRows, kCols], contiguous.
Tensor Block(const Tensor& whole, const std::vector<int64_t>& rows, int64_t col0, int64_t cols) {
  Tensor out = Tensor::Cpu({static_cast<int64_t>(rows.size()), cols}, DType::kF32);
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int64_t c = 0; c < cols; ++c) {
      out.data<float>()[i * cols + c] = whole.data<float>()[rows[i] * kCols + col0 + c];
    }
  }
  return out;
}

Tensor RowIds(const std::vector<int64_t>& rows) {
  Tensor t = Tensor::Cpu({static_cast<int64_t>(rows.size())}, DType::kI64);
  std::copy(rows.begin(), rows.end(), t.data<int64_t>());
  return t;
}

TEST(LoraDropoutAt, BlockGetsTheWholeBatchMask) {
  auto ctx = Context::Cpu();
  const Tensor x = RandomUniform({kRows, kCols}, 1);
  Tensor want = Tensor::Cpu({kRows, kCols}, DType::kF32);
  ASSERT_TRUE(LoraDropout(*ctx, want, x, kSeed, kP, false).ok());
  const std::vector<int64_t> rows = {17, 3, 4, 20, 9};
  for (int64_t col0 : {0, 5, 12}) {
    const int64_t cols = 19;
    const Tensor xb = Block(x, rows, col0, cols);
    Tensor y = Tensor::Cpu(xb.shape(), DType::kF32);
    ASSERT_TRUE(LoraDropoutAt(*ctx, y, xb, kSeed, kP, false, RowIds(rows), col0).ok());
    EXPECT_TRUE(AllClose(y, Block(want, rows, col0, cols), {0.0, 0.0})) << "col0 " << col0;
    // Accumulating onto a random y0.
    const Tensor y0 = RandomUniform(xb.shape(), 2);
    Tensor acc = Tensor::Cpu(xb.shape(), DType::kF32);
    std::copy(y0.data<float>(), y0.data<float>() + y0.numel(), acc.data<float>());
    ASSERT_TRUE(LoraDropoutAt(*ctx, acc, xb, kSeed, kP, true, RowIds(rows), col0).ok());
    Tensor expect = Block(want, rows, col0, cols);
    for (int64_t i = 0; i < expect.numel(); ++i) expect.data<float>()[i] += y0.data<float>()[i];
    EXPECT_TRUE(AllClose(acc, expect, {0.0, 0.0})) << "accumulate, col0 " << col0;
  }
  // Some elements are dropped and some kept (the test is not vacuous).
  int64_t dropped = 0;
  for (int64_t i = 0; i < want.numel(); ++i) dropped += want.data<float>()[i] == 0.0f;
  EXPECT_GT(dropped, 0);
  EXPECT_LT(dropped, want.numel());
}

TEST(LoraDropoutAt, WithoutRowIdsAndOffsetIsLoraDropout) {
  auto ctx = Context::Cpu();
  const Tensor x = RandomUniform({kRows, kCols}, 3);
  Tensor want = Tensor::Cpu({kRows, kCols}, DType::kF32);
  Tensor got = Tensor::Cpu({kRows, kCols}, DType::kF32);
  ASSERT_TRUE(LoraDropout(*ctx, want, x, kSeed, kP, false).ok());
  ASSERT_TRUE(LoraDropoutAt(*ctx, got, x, kSeed, kP, false, Tensor(), 0).ok());
  EXPECT_TRUE(AllClose(got, want, {0.0, 0.0}));
}

TEST(LoraDropoutAt, RejectsBadArguments) {
  auto ctx = Context::Cpu();
  const Tensor x = RandomUniform({4, 8}, 4);
  Tensor y = Tensor::Cpu({4, 8}, DType::kF32);
  Tensor ids32 = Tensor::CpuZeros({4}, DType::kI32);
  EXPECT_EQ(LoraDropoutAt(*ctx, y, x, kSeed, kP, false, ids32, 0).code(),
            StatusCode::kInvalidArgument);
  Tensor ids_short = Tensor::CpuZeros({3}, DType::kI64);
  EXPECT_EQ(LoraDropoutAt(*ctx, y, x, kSeed, kP, false, ids_short, 0).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(LoraDropoutAt(*ctx, y, x, kSeed, kP, false, Tensor(), -1).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(LoraDropoutAt(*ctx, y, x, kSeed, 1.0f, false, Tensor(), 0).code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::ops
