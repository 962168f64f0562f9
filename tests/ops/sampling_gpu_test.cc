// ops::ArgmaxRows on CUDA against the CPU reference on the same (bf16-rounded) values: random
// rows with the edge cases of sampling_case.h, vocabularies from 9 to 128256 columns, f32 and
// bf16 (bf16 rounding makes ties common: the lower index must still win).
#include <gtest/gtest.h>

#include "tests/ops/sampling_case.h"

namespace tandem::ops {
namespace {

TEST(ArgmaxRowsGpu, MatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto cpu = Context::Cpu();
  auto gpu = Context::Cuda(0).value();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t cols : {9, 270, 32000, 128256}) {
      SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " cols " << cols);
      const int64_t valid = cols - 3, rows = 37;
      const Tensor logits = MakeArgmaxRows(cols + 1, rows, cols, valid);
      const Tensor cast = CastCpu(logits, dtype).value();
      const Tensor rounded = CastCpu(cast, DType::kF32).value();
      const Tensor dev = CopyToDeviceBlocking(cast, gpu->allocator()).value();
      Tensor ids = Tensor::Empty({rows}, DType::kI32, gpu->allocator()).value();
      ASSERT_TRUE(ArgmaxRows(*gpu, ids, dev, valid).ok());
      const Tensor got = CopyToHostBlocking(ids).value();
      Tensor want = Tensor::Cpu({rows}, DType::kI32);
      ASSERT_TRUE(ArgmaxRows(*cpu, want, rounded, valid).ok());
      for (int64_t r = 0; r < rows; ++r) {
        EXPECT_EQ(got.data<int32_t>()[r], want.data<int32_t>()[r]) << "row " << r;
      }
      EXPECT_EQ(std::vector<int32_t>(want.data<int32_t>(), want.data<int32_t>() + rows),
                ReferenceArgmax(rounded, valid));
    }
  }
}

}  // namespace
}  // namespace tandem::ops
