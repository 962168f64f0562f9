#include "core/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/common/testing.h"

namespace tandem {
namespace {

TEST(StatusTest, ContextIsPrefixedAsErrorsRise) {
  auto inner = []() -> Status { return InvalidArgumentError("bad value"); };
  auto outer = [&]() -> Status {
    TANDEM_RETURN_IF_ERROR(inner());
    return Status::Ok();
  };
  Status s = outer();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tensor_test.cc:"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("bad value"), std::string::npos);
}

TEST(StatusTest, AssignOrReturnPassesValuesAndErrors) {
  auto make = [](bool ok) -> StatusOr<int> {
    if (ok) return 7;
    return NotFoundError("no int");
  };
  auto use = [&](bool ok) -> StatusOr<int> {
    TANDEM_ASSIGN_OR_RETURN(int v, make(ok));
    return v + 1;
  };
  EXPECT_EQ(*use(true), 8);
  EXPECT_EQ(use(false).status().code(), StatusCode::kNotFound);
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly half way between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 is half way between 1+2^-7 (odd) and 1+2^-6 (even): goes up.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  // Just above half way rounds up.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20))),
            1.0f + std::ldexp(1.0f, -7));
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::infinity()))));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(3.4e38f))));  // rounds past the largest bf16
}

TEST(DTypeTest, F16RoundTripsAndRounds) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(F16ToFloat(FloatToF16(f)), f) << f;
  }
  EXPECT_TRUE(std::isinf(F16ToFloat(FloatToF16(70000.0f))));
  EXPECT_EQ(F16ToFloat(FloatToF16(1.0f + std::ldexp(1.0f, -11))), 1.0f);  // tie to even
  EXPECT_EQ(*ParseDType("BF16"), DType::kBF16);
  EXPECT_FALSE(ParseDType("f8").ok());
}

TEST(TensorTest, ViewsShareStorageAndSliceHasStrides) {
  Tensor x = testing::RandomUniform({4, 6}, 1);
  Tensor rows = x.Slice(0, 1, 3);
  EXPECT_EQ(rows.shape(), (Shape{2, 6}));
  EXPECT_TRUE(rows.is_contiguous());
  Tensor cols = x.Slice(1, 2, 5);
  EXPECT_EQ(cols.shape(), (Shape{4, 3}));
  EXPECT_FALSE(cols.is_contiguous());
  EXPECT_EQ(cols.stride(0), 6);
  EXPECT_EQ(cols.data<float>()[0], x.data<float>()[2]);
  Tensor flat = x.View({-1});
  EXPECT_EQ(flat.shape(), (Shape{24}));
  flat.data<float>()[5] = 42.0f;
  EXPECT_EQ(x.data<float>()[5], 42.0f);
}

TEST(TensorTest, HostCopiesConvertDTypes) {
  Tensor x = testing::RandomUniform({3, 5}, 2);
  Tensor b = *CastCpu(x, DType::kBF16);
  Tensor back = *CastCpu(b, DType::kF32);
  EXPECT_TRUE(testing::AllClose(back, x, {0, 1.0 / 256}));
  Tensor bad = Tensor::Cpu({5, 3}, DType::kF32);
  Status s = CopyTensor(bad, x);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("[3, 5]"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tandem
