// ops::LoraDropoutAt (ops/lora.h) on CUDA against the CPU reference: f32 bitwise (one f32
// multiply by the same mask value); bf16 within one bf16 rounding (1e-2 relative) of the CPU
// result on the same bf16-rounded inputs; row ids in any order, a column offset, a row stride,
// plain and accumulating. Skipped without a GPU.
#include <gtest/gtest.h>

#include <vector>

#include "ops/context.h"
#include "ops/lora.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

using ::tandem::testing::AllClose;
using ::tandem::testing::RandomUniform;

constexpr uint64_t kSeed = 7;
constexpr float kP = 0.25f;

// out = drop(x) (+ y0 when accumulating) on `ctx`, from host f32 x [N, C] and y0 [N, C]; x is
// read as a column window of a wider device buffer (row stride C + 3). Returns host f32.
Tensor DropoutOn(Context& ctx, DType dtype, const Tensor& x, const Tensor& y0, const Tensor& ids,
                 int64_t col_offset, bool accumulate) {
  const int64_t N = x.dim(0), C = x.dim(1);
  Tensor wide_host = Tensor::CpuZeros({N, C + 3}, DType::kF32);
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      wide_host.data<float>()[i * (C + 3) + 1 + c] = x.data<float>()[i * C + c];
    }
  }
  Tensor wide = *CopyToDeviceBlocking(*CastCpu(wide_host, dtype), ctx.allocator());
  Tensor xd = wide.Slice(1, 1, C + 1);  // [N, C], row stride C + 3
  Tensor y = *CopyToDeviceBlocking(*CastCpu(y0, dtype), ctx.allocator());
  Tensor idd = ids.defined() ? *CopyToDeviceBlocking(ids, ctx.allocator()) : Tensor();
  TANDEM_CHECK_OK(LoraDropoutAt(ctx, y, xd, kSeed, kP, accumulate, idd, col_offset));
  TANDEM_CHECK_OK(ctx.Synchronize());
  return *CastCpu(*CopyToHostBlocking(y), DType::kF32);
}

TEST(LoraDropoutAtGpu, CudaMatchesCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto cpu = Context::Cpu();
  auto gpu = *Context::Cuda(0);
  const int64_t N = 70, C = 131;
  const Tensor x = RandomUniform({N, C}, 11);
  const Tensor y0 = RandomUniform({N, C}, 12);
  Tensor ids = Tensor::Cpu({N}, DType::kI64);
  for (int64_t i = 0; i < N; ++i) ids.data<int64_t>()[i] = (i * 37 + 5) % 1000 + 4096;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    // The CPU reference sees the inputs the GPU sees (rounded to dtype).
    const Tensor xr = *CastCpu(*CastCpu(x, dtype), DType::kF32);
    const Tensor yr = *CastCpu(*CastCpu(y0, dtype), DType::kF32);
    for (bool accumulate : {false, true}) {
      for (const Tensor& row_ids : {Tensor(), ids}) {
        const Tensor want = DropoutOn(*cpu, DType::kF32, xr, yr, row_ids, 9, accumulate);
        const Tensor got = DropoutOn(*gpu, dtype, x, y0, row_ids, 9, accumulate);
        const ::tandem::testing::Tolerance tol = dtype == DType::kF32
                                                     ? ::tandem::testing::Tolerance{0, 0}
                                                     : ::tandem::testing::Tolerance{0, 1e-2};
        EXPECT_TRUE(AllClose(got, want, tol))
            << DTypeName(dtype) << (accumulate ? " accumulate" : "")
            << (row_ids.defined() ? " with row ids" : "");
      }
    }
  }
}

}  // namespace
}  // namespace tandem::ops
