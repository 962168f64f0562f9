// ops::CudaGraph: a capture records and does not run; a replay reads the inputs' current bytes and
// gives exactly the eager result; temporaries come from the graph's arena, which grows when the
// captured function asks for more; an op's error ends the capture cleanly (the stream works
// after); a CPU context is refused.
#include <gtest/gtest.h>

#include <cstring>

#include "ops/cuda_graph.h"
#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

Tensor Device(Context& ctx, const Tensor& host) {
  StatusOr<Tensor> t = CopyToDeviceBlocking(host, ctx.allocator());
  TANDEM_CHECK_OK(t.status());
  return *t;
}

Tensor Host(const Tensor& t) {
  StatusOr<Tensor> h = CopyToHostBlocking(t);
  TANDEM_CHECK_OK(h.status());
  return *h;
}

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.num_bytes() == b.num_bytes() &&
         std::memcmp(a.raw_data(), b.raw_data(), static_cast<size_t>(a.num_bytes())) == 0;
}

TEST(CudaGraphTest, CpuContextIsRefused) {
  auto ctx = Context::Cpu();
  StatusOr<CudaGraph> g = CudaGraph::Capture(*ctx, 1 << 20, [] { return Status::Ok(); });
  EXPECT_EQ(g.status().code(), StatusCode::kUnimplemented);
}

TEST(CudaGraphGpuTest, ReplaysReadCurrentInputsAndEqualEagerBitwise) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(Context::Cuda(0)).value();
  const int64_t m = 37, k = 91, n = 53;  // odd sizes
  Tensor x = Device(*ctx, testing::RandomUniform({m, k}, 1));
  Tensor w = Device(*ctx, testing::RandomUniform({n, k}, 2));
  Tensor bias = Device(*ctx, testing::RandomUniform({m, n}, 3));
  Tensor out = std::move(Tensor::Empty({m, n}, DType::kF32, ctx->allocator())).value();
  // y = x w^T (a temporary from the arena), out = y + bias.
  auto body = [&]() -> Status {
    TANDEM_ASSIGN_OR_RETURN(Tensor y, Tensor::Empty({m, n}, DType::kF32, ctx->allocator()));
    TANDEM_RETURN_IF_ERROR(Matmul(*ctx, y, x, w, false, true));
    return Add(*ctx, out, y, bias);
  };
  TANDEM_CHECK_OK(Fill(*ctx, out, 7.0f));
  StatusOr<CudaGraph> g = CudaGraph::Capture(*ctx, 1 << 20, body);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_GE(g->num_nodes(), 2);
  // Capturing ran nothing: out still holds the fill.
  Tensor before = Host(out);
  for (int64_t i = 0; i < before.numel(); ++i) ASSERT_EQ(before.data<float>()[i], 7.0f);

  for (uint64_t round = 0; round < 3; ++round) {
    // New input bytes at the captured address, in stream order before the replay.
    Tensor fresh = Device(*ctx, testing::RandomUniform({m, k}, 10 + round));
    TANDEM_CHECK_OK(CopyTensor(x, fresh, ctx->stream()));
    ASSERT_TRUE(g->Launch(*ctx).ok());
    Tensor got = Host(out);
    TANDEM_CHECK_OK(body());  // eager, same kernels
    Tensor want = Host(out);
    EXPECT_TRUE(SameBytes(got, want)) << "round " << round;
  }
}

TEST(CudaGraphGpuTest, ArenaGrowsWhenTheFunctionNeedsMore) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(Context::Cuda(0)).value();
  const int64_t elems = (3 << 20) / 4;  // 3 MiB of f32 against a 1 MiB first arena
  Tensor out = std::move(Tensor::Empty({elems}, DType::kF32, ctx->allocator())).value();
  int calls = 0;
  StatusOr<CudaGraph> g = CudaGraph::Capture(*ctx, 1 << 20, [&]() -> Status {
    ++calls;
    TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty({elems}, DType::kF32, ctx->allocator()));
    TANDEM_RETURN_IF_ERROR(Fill(*ctx, t, 2.5f));
    return Add(*ctx, out, t, t);
  });
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(calls, 3);  // 1 MiB, 2 MiB, then 4 MiB fits
  EXPECT_GE(g->arena_bytes(), 3 << 20);
  ASSERT_TRUE(g->Launch(*ctx).ok());
  Tensor got = Host(out);
  for (int64_t i = 0; i < elems; i += 4099) ASSERT_EQ(got.data<float>()[i], 5.0f) << i;
}

TEST(CudaGraphGpuTest, AnErrorEndsTheCaptureAndTheStreamStillWorks) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto ctx = std::move(Context::Cuda(0)).value();
  Tensor a = Device(*ctx, testing::RandomUniform({5, 7}, 4));
  Tensor b = Device(*ctx, testing::RandomUniform({6, 7}, 5));  // wrong shape for Add
  Tensor out = std::move(Tensor::Empty({5, 7}, DType::kF32, ctx->allocator())).value();
  StatusOr<CudaGraph> g = CudaGraph::Capture(*ctx, 1 << 20, [&]() -> Status {
    TANDEM_RETURN_IF_ERROR(Fill(*ctx, out, 1.0f));
    return Add(*ctx, out, a, b);
  });
  EXPECT_EQ(g.status().code(), StatusCode::kInvalidArgument) << g.status().ToString();
  // Not capturing any more: eager work runs and the allocator is the context's own again.
  TANDEM_CHECK_OK(Fill(*ctx, out, 3.0f));
  Tensor got = Host(out);
  EXPECT_EQ(got.data<float>()[0], 3.0f);
  Tensor big = std::move(Tensor::Empty({1 << 22}, DType::kF32, ctx->allocator())).value();
  EXPECT_TRUE(big.defined());
}

}  // namespace
}  // namespace tandem::ops
