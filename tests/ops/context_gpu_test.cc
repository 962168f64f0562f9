// ops::Context streams: Pace(d) leaves at most d marked pieces queued (so two Pace(1) calls in a
// row drain the stream, while work enqueued without one stays queued) and refuses d < 1; contexts
// of both priorities compute the same results side by side (the serving engine runs inference on
// a kHigh one and fine-tuning on a kNormal one).
#include <gtest/gtest.h>

#include <cstring>

#include "ops/context.h"
#include "ops/ops.h"
#include "ops/stream_sync.h"
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

TEST(ContextTest, WaitForStreamOnCpuContextsIsANoOp) {
  auto a = Context::Cpu();
  auto b = Context::Cpu();
  EXPECT_TRUE(WaitForStream(*a, *b).ok());
  EXPECT_TRUE(WaitForStream(*a, *a).ok());
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

// A second stream that waits for the first sees its results: work queued on `side` after
// WaitForStream(side, main) starts only after main's GEMMs, and WaitForStream(main, side) makes
// main wait for side's copy. Contexts of different devices are refused.
TEST(ContextGpuTest, WaitForStreamOrdersTwoStreams) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto main = std::move(Context::Cuda(0)).value();
  auto side = std::move(Context::Cuda(0)).value();
  auto cpu = Context::Cpu();
  EXPECT_EQ(WaitForStream(*main, *cpu).code(), StatusCode::kInvalidArgument);
  const int64_t n = 2048;
  Tensor a =
      std::move(CopyToDeviceBlocking(testing::RandomUniform({n, n}, 3), main->allocator())).value();
  Tensor out = std::move(Tensor::Empty({n, n}, DType::kF32, main->allocator())).value();
  Tensor copy = std::move(Tensor::Empty({n, n}, DType::kF32, main->allocator())).value();
  ASSERT_TRUE(Fill(*main, out, 0.0f).ok());
  for (int rep = 0; rep < 20; ++rep) {  // many milliseconds queued before side's copy
    ASSERT_TRUE(Matmul(*main, out, a, a, false, false).ok());
  }
  ASSERT_TRUE(WaitForStream(*side, *main).ok());
  ASSERT_TRUE(CopyTensor(copy, out, side->stream()).ok());
  ASSERT_TRUE(WaitForStream(*main, *side).ok());
  ASSERT_TRUE(main->Synchronize().ok());  // waits for side's copy through the event
  EXPECT_TRUE(StreamIdle(*side));
  const Tensor want = std::move(CopyToHostBlocking(out)).value();
  const Tensor got = std::move(CopyToHostBlocking(copy)).value();
  EXPECT_EQ(std::memcmp(want.raw_data(), got.raw_data(), want.num_bytes()), 0);
}

}  // namespace
}  // namespace tandem::ops
