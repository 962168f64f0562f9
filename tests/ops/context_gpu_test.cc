// ops::Context streams: Pace(d) leaves at most d marked pieces queued (so two Pace(1) calls in a
// row drain the stream, while work enqueued without one stays queued) and refuses d < 1; contexts
// of both priorities compute the same results side by side (the serving engine runs inference on
// a kHigh one and fine-tuning on a kNormal one). An SM partition (CUDA green contexts) runs
// kernels on fewer SMs, switches in and out with the context's work kept in order, and computes
// bitwise what the whole device computes.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

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

TEST(ContextTest, CpuContextHasNoSmPartition) {
  auto ctx = Context::Cpu();
  EXPECT_EQ(ctx->CreateSmPartition(4).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ctx->UseSmPartition(true).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(ctx->UseSmPartition(false).ok());
  EXPECT_FALSE(ctx->in_sm_partition());
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

int SmCount() {
  int sms = 0;
#ifdef TANDEM_WITH_CUDA
  EXPECT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
#endif
  return sms;
}

// Seconds for `reps` f32 GEMMs of [n, n] on ctx's current stream, waited for.
double GemmSeconds(Context& ctx, Tensor& out, const Tensor& a, int reps) {
  EXPECT_TRUE(ctx.Synchronize().ok());
  const auto t0 = std::chrono::steady_clock::now();
  for (int rep = 0; rep < reps; ++rep) EXPECT_TRUE(Matmul(ctx, out, a, a, false, false).ok());
  EXPECT_TRUE(ctx.Synchronize().ok());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(ContextGpuTest, SmPartitionRunsOnFewerSmsAndComputesTheSame) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto whole = std::move(Context::Cuda(0)).value();
  auto part = std::move(Context::Cuda(0)).value();
  const int sms = SmCount();
  EXPECT_EQ(part->UseSmPartition(true).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(part->CreateSmPartition(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(part->CreateSmPartition(sms).status().code(), StatusCode::kInvalidArgument);
  StatusOr<int> got = part->CreateSmPartition(16);
  if (got.status().code() == StatusCode::kUnavailable) {
    GTEST_SKIP() << "no green contexts here: " << got.status().ToString();
  }
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  std::printf("SM partition: asked 16 of %d SMs, got %d\n", sms, *got);
  EXPECT_GE(*got, 16);
  EXPECT_LT(*got, sms);
  EXPECT_EQ(part->CreateSmPartition(16).status().code(), StatusCode::kFailedPrecondition);

  // The same GEMMs take several times as long on the partition (16 of 132 SMs on an H100/H200).
  const int64_t n = 2048;
  Tensor a =
      std::move(CopyToDeviceBlocking(testing::RandomUniform({n, n}, 5), part->allocator())).value();
  Tensor out = std::move(Tensor::Empty({n, n}, DType::kF32, part->allocator())).value();
  (void)GemmSeconds(*part, out, a, 2);  // warm-up
  const double on_whole = GemmSeconds(*part, out, a, 20);
  ASSERT_TRUE(part->UseSmPartition(true).ok());
  EXPECT_TRUE(part->in_sm_partition());
  (void)GemmSeconds(*part, out, a, 2);
  const double on_part = GemmSeconds(*part, out, a, 20);
  ASSERT_TRUE(part->UseSmPartition(false).ok());
  std::printf("20 GEMMs of %lld^3 f32: %.2f ms on the device, %.2f ms on %d SMs\n",
              static_cast<long long>(n), on_whole * 1e3, on_part * 1e3, *got);
  EXPECT_GT(on_part, 2.0 * on_whole) << "the partition did not restrict the SMs the GEMMs used";

  // A chain of dependent ops (GEMM, cast, attention forward and backward, whose kernels take
  // more than 48 KB of shared memory) switching streams between ops, against the whole device.
  const int64_t b = 2, t = 384, hq = 8, hkv = 2, d = 64;
  std::vector<Tensor> results[2];
  Context* ctxs[2] = {whole.get(), part.get()};
  for (int k = 0; k < 2; ++k) {
    Context& ctx = *ctxs[k];
    const auto lane = [&](bool on) {
      if (k == 1) {
        ASSERT_TRUE(ctx.UseSmPartition(on).ok());
      }
    };
    Allocator& al = ctx.allocator();
    const auto empty = [&](const Shape& shape, DType dt) {
      return std::move(Tensor::Empty(shape, dt, al)).value();
    };
    const auto upload = [&](const Shape& shape, uint64_t seed) {
      return std::move(CopyToDeviceBlocking(testing::RandomUniform(shape, seed), al)).value();
    };
    const Tensor x = upload({b * t, hq * d}, 6);
    const Tensor w = upload({hq * d, (hq + 2 * hkv) * d}, 7);
    const Tensor g = upload({b, t, hq, d}, 8);
    Tensor qkv = empty({b * t, (hq + 2 * hkv) * d}, DType::kF32);
    lane(true);
    ASSERT_TRUE(Matmul(ctx, qkv, x, w, false, false).ok());
    Tensor qkv16 = empty({b, t, hq + 2 * hkv, d}, DType::kBF16);
    lane(false);
    ASSERT_TRUE(Cast(ctx, qkv16, qkv.View({b, t, hq + 2 * hkv, d})).ok());
    const Tensor q = qkv16.Slice(2, 0, hq);
    const Tensor kk = qkv16.Slice(2, hq, hq + hkv);
    const Tensor v = qkv16.Slice(2, hq + hkv, hq + 2 * hkv);
    Tensor o = empty({b, t, hq, d}, DType::kBF16), lse = empty({b, hq, t}, DType::kF32);
    lane(true);
    const float scale = 0.125f;
    const Status forward = AttentionForward(ctx, o, lse, q, kk, v, scale);
    ASSERT_TRUE(forward.ok()) << forward.ToString();
    Tensor dout = empty({b, t, hq, d}, DType::kBF16);
    ASSERT_TRUE(Cast(ctx, dout, g).ok());
    // The gradients share one packed tensor, strided like q, k and v.
    Tensor dqkv = empty({b, t, hq + 2 * hkv, d}, DType::kBF16);
    Tensor dq = dqkv.Slice(2, 0, hq), dk = dqkv.Slice(2, hq, hq + hkv);
    Tensor dv = dqkv.Slice(2, hq + hkv, hq + 2 * hkv);
    lane(false);
    const Status backward = AttentionBackward(ctx, dq, dk, dv, dout, q, kk, v, o, lse, scale);
    ASSERT_TRUE(backward.ok()) << backward.ToString();
    lane(true);
    Tensor dqkv2 = empty({b, t, hq + 2 * hkv, d}, DType::kBF16);
    ASSERT_TRUE(CopyTensor(dqkv2, dqkv, ctx.stream()).ok());
    ASSERT_TRUE(ctx.Pace(1).ok());  // the partition's own ring
    ASSERT_TRUE(ctx.Pace(1).ok());
    EXPECT_TRUE(StreamIdle(ctx));
    lane(false);
    ASSERT_TRUE(ctx.Synchronize().ok());
    for (const Tensor* r : {&qkv, &o, &lse, &dqkv2}) {
      results[k].push_back(std::move(CopyToHostBlocking(*r)).value());
    }
  }
  const char* names[] = {"qkv", "out", "lse", "dq|dk|dv"};
  for (size_t i = 0; i < results[0].size(); ++i) {
    EXPECT_EQ(std::memcmp(results[0][i].raw_data(), results[1][i].raw_data(),
                          static_cast<size_t>(results[0][i].num_bytes())),
              0)
        << names[i] << " computed on the SM partition differs from the whole device's";
  }
}

}  // namespace
}  // namespace tandem::ops
