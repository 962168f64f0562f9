// ops::Context streams: Idle() is true on a CPU context and on a drained stream, false while
// enqueued work runs; Pace(d) leaves at most d marked pieces queued (so two Pace(1) calls in a
// row drain the stream); contexts of both priorities compute the same results side by side (the
// serving engine runs inference on a kHigh one and fine-tuning on a kNormal one).
#include <gtest/gtest.h>

#include <cstring>

#include "ops/context.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

TEST(ContextTest, CpuContextIsAlwaysIdle) {
  auto ctx = Context::Cpu();
  StatusOr<bool> idle = ctx->Idle();
  ASSERT_TRUE(idle.ok());
  EXPECT_TRUE(*idle);
  EXPECT_TRUE(ctx->Pace(2).ok());
  EXPECT_EQ(ctx->Pace(0).code(), StatusCode::kInvalidArgument);
}

TEST(ContextGpuTest, IdleFollowsTheStreamAndPrioritiesComputeTheSame) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto high = std::move(Context::Cuda(0, StreamPriority::kHigh)).value();
  auto normal = std::move(Context::Cuda(0, StreamPriority::kNormal)).value();
  const int64_t n = 2048;
  const Tensor a_host = testing::RandomUniform({n, n}, 1);
  const Tensor b_host = testing::RandomUniform({n, n}, 2);
  Tensor out[2];
  Context* ctxs[2] = {high.get(), normal.get()};
  for (int k = 0; k < 2; ++k) {
    Context& ctx = *ctxs[k];
    Tensor a = std::move(CopyToDeviceBlocking(a_host, ctx.allocator())).value();
    Tensor b = std::move(CopyToDeviceBlocking(b_host, ctx.allocator())).value();
    out[k] = std::move(Tensor::Empty({n, n}, DType::kF32, ctx.allocator())).value();
    // About 0.3 TFLOP of f32 GEMMs: many milliseconds of work, queued before the first query.
    for (int rep = 0; rep < 20; ++rep) {
      ASSERT_TRUE(Matmul(ctx, out[k], a, b, false, false).ok());
    }
    StatusOr<bool> busy = ctx.Idle();
    ASSERT_TRUE(busy.ok()) << busy.status().ToString();
    EXPECT_FALSE(*busy) << "the stream reported idle with 20 GEMMs just enqueued";
    ASSERT_TRUE(ctx.Synchronize().ok());
    StatusOr<bool> idle = ctx.Idle();
    ASSERT_TRUE(idle.ok());
    EXPECT_TRUE(*idle);
    // Paced pieces: after each, at most one queued; a second mark with nothing new drains it.
    for (int rep = 0; rep < 6; ++rep) {
      for (int g = 0; g < 3; ++g) ASSERT_TRUE(Matmul(ctx, out[k], a, b, false, false).ok());
      ASSERT_TRUE(ctx.Pace(1).ok());
    }
    ASSERT_TRUE(ctx.Pace(1).ok());
    idle = ctx.Idle();
    ASSERT_TRUE(idle.ok());
    EXPECT_TRUE(*idle) << "Pace(1) twice in a row left work queued";
  }
  const Tensor h0 = std::move(CopyToHostBlocking(out[0])).value();
  const Tensor h1 = std::move(CopyToHostBlocking(out[1])).value();
  EXPECT_EQ(std::memcmp(h0.raw_data(), h1.raw_data(), static_cast<size_t>(h0.num_bytes())), 0);
}

}  // namespace
}  // namespace tandem::ops
