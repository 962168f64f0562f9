// ops::Context streams: Pace(d) leaves at most d marked pieces queued (so two Pace(1) calls in a
// row drain the stream, while work enqueued without one stays queued) and refuses d < 1; contexts
// of both priorities compute the same results side by side (the serving engine runs inference on
// a kHigh one and fine-tuning on a kNormal one).
#include <gtest/gtest.h>

#include <cstring>

#include "ops/context.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::ops {
namespace {

TEST(ContextTest, CpuContextPacesAtOnce) {
  auto ctx = Context::Cpu();
  EXPECT_TRUE(ctx->Pace(2).ok());
  EXPECT_EQ(ctx->Pace(0).code(), StatusCode::kInvalidArgument);
}

// Whether everything enqueued on ctx's stream has finished, without waiting.
bool StreamIdle(const Context& ctx) {
#ifdef TANDEM_WITH_CUDA
  const cudaError_t err = cudaStreamQuery(reinterpret_cast<cudaStream_t>(ctx.stream()));
  EXPECT_TRUE(err == cudaSuccess || err == cudaErrorNotReady) << cudaGetErrorString(err);
  return err == cudaSuccess;
#else
  (void)ctx;
  return true;  // never reached: the GPU test skips first
#endif
}

TEST(ContextGpuTest, PaceBoundsTheQueueAndPrioritiesComputeTheSame) {
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
    EXPECT_FALSE(StreamIdle(ctx)) << "the stream reported idle with 20 GEMMs just enqueued";
    ASSERT_TRUE(ctx.Synchronize().ok());
    EXPECT_TRUE(StreamIdle(ctx));
    // Paced pieces: after each, at most one queued; a second mark with nothing new drains it.
    for (int rep = 0; rep < 6; ++rep) {
      for (int g = 0; g < 3; ++g) ASSERT_TRUE(Matmul(ctx, out[k], a, b, false, false).ok());
      ASSERT_TRUE(ctx.Pace(1).ok());
    }
    ASSERT_TRUE(ctx.Pace(1).ok());
    EXPECT_TRUE(StreamIdle(ctx)) << "Pace(1) twice in a row left work queued";
  }
  const Tensor h0 = std::move(CopyToHostBlocking(out[0])).value();
  const Tensor h1 = std::move(CopyToHostBlocking(out[1])).value();
  EXPECT_EQ(std::memcmp(h0.raw_data(), h1.raw_data(), static_cast<size_t>(h0.num_bytes())), 0);
}

}  // namespace
}  // namespace tandem::ops
