// ops::ArgmaxRows on the CPU: every row against std::max_element, ties, columns past `valid`,
// NaN / +inf / all -inf rows, a row stride wider than the row, and validation errors.
#include <gtest/gtest.h>

#include "tests/ops/sampling_case.h"

namespace tandem::ops {
namespace {

std::vector<int32_t> ArgmaxOf(Context& ctx, const Tensor& logits, int64_t valid) {
  Tensor ids = Tensor::Cpu({logits.dim(0)}, DType::kI32);
  EXPECT_TRUE(ArgmaxRows(ctx, ids, logits, valid).ok());
  return std::vector<int32_t>(ids.data<int32_t>(), ids.data<int32_t>() + ids.numel());
}

TEST(ArgmaxRows, MatchesTheReferenceOnEveryRow) {
  auto ctx = Context::Cpu();
  for (int64_t cols : {9, 270, 32000}) {
    const int64_t valid = cols - 3;
    const Tensor logits = MakeArgmaxRows(cols, 12, cols, valid);
    const std::vector<int32_t> got = ArgmaxOf(*ctx, logits, valid);
    EXPECT_EQ(got, ReferenceArgmax(logits, valid)) << "cols " << cols;
    EXPECT_EQ(got[0], valid / 3) << "ties go to the lower index";
    EXPECT_NE(got[1], valid) << "columns past valid are ignored";
    for (int r : {2, 3, 4}) EXPECT_EQ(got[r], kArgmaxInvalidRow) << "row " << r;
    EXPECT_EQ(got[5], valid - 2);
    EXPECT_EQ(got[6], valid - 1);
  }
}

TEST(ArgmaxRows, ReadsRowsThroughTheirStride) {
  auto ctx = Context::Cpu();
  const Tensor wide = MakeArgmaxRows(5, 10, 300, 200);
  const Tensor part = wide.Slice(1, 0, 250);  // [10, 250], row stride 300
  Tensor dense = Tensor::Cpu({10, 250}, DType::kF32);
  for (int64_t r = 0; r < 10; ++r) {
    std::copy(wide.data<float>() + r * 300, wide.data<float>() + r * 300 + 250,
              dense.data<float>() + r * 250);
  }
  EXPECT_EQ(ArgmaxOf(*ctx, part, 200), ReferenceArgmax(dense, 200));
}

TEST(ArgmaxRows, RejectsBadArguments) {
  auto ctx = Context::Cpu();
  const Tensor logits = testing::RandomUniform({3, 8}, 1);
  Tensor ids = Tensor::Cpu({3}, DType::kI32);
  EXPECT_EQ(ArgmaxRows(*ctx, ids, logits, 0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ArgmaxRows(*ctx, ids, logits, 9).code(), StatusCode::kInvalidArgument);
  Tensor short_ids = Tensor::Cpu({2}, DType::kI32);
  EXPECT_EQ(ArgmaxRows(*ctx, short_ids, logits, 8).code(), StatusCode::kInvalidArgument);
  Tensor f32_ids = Tensor::Cpu({3}, DType::kF32);
  EXPECT_EQ(ArgmaxRows(*ctx, f32_ids, logits, 8).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tandem::ops
