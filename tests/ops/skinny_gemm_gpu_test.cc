// The skinny GEMM (ops/cuda/gemm_skinny.cu) through ops::Matmul: x [M, K] W^T in bf16 with
// M <= 64 against the CPU f32 product of the same rounded inputs, over odd token counts, feature
// counts that are not a multiple of the block, and K with and without split-K; row strides wider
// than the rows; bitwise repeatable; and CUDA graph replays of a split-K launch (its counters
// must be back to zero after every launch) equal to eager launches.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "ops/cuda_graph.h"
#include "ops/ops.h"
#include "tests/common/testing.h"
#include "tests/ops/op_test_util.h"

namespace tandem::ops {
namespace {

struct Operands {
  Tensor x_host, w_host;  // f32, already rounded to bf16 values
  Tensor x, w;            // bf16 on the device (views with row stride ld)
};

// [rows, cols] of uniform values rounded to bf16, stored with row stride ld on the device.
void Make(Context& gpu, int64_t rows, int64_t cols, int64_t ld, uint64_t seed, Tensor* host,
          Tensor* dev) {
  Tensor wide = testing::RandomUniform({rows, ld}, seed);
  Tensor wide_bf16 = CastCpu(wide, DType::kBF16).value();
  Tensor back = CastCpu(wide_bf16, DType::kF32).value();
  *host = Tensor::Cpu({rows, cols}, DType::kF32);
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(host->data<float>() + r * cols, back.data<float>() + r * ld, cols * sizeof(float));
  }
  Tensor d = CopyToDeviceBlocking(wide_bf16, gpu.allocator()).value();
  *dev = d.Slice(1, 0, cols);
}

Tensor Reference(const Tensor& x, const Tensor& w) {
  auto cpu = Context::Cpu();
  Tensor y = Tensor::Cpu({x.dim(0), w.dim(0)}, DType::kF32);
  TANDEM_CHECK_OK(Matmul(*cpu, y, x, w, false, true));
  return y;
}

Tensor HostF32(const Tensor& t) {
  return CastCpu(CopyToHostBlocking(t).value(), DType::kF32).value();
}

TEST(SkinnyGemmGpu, MatchesCpuOverShapes) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto gpu = Context::Cuda(0).value();
  struct Shape3 {
    int64_t m, n, k, ld_extra;
  };
  // (n, k) from the decode projections and odd ones; k = 5632 and small n take split-K.
  const std::vector<Shape3> shapes = {
      {1, 2560, 2048, 0},  {3, 2048, 2048, 8},  {8, 999, 1024, 0},  {17, 11264, 2048, 0},
      {32, 2048, 5632, 0}, {33, 300, 4096, 16}, {64, 4096, 512, 0}, {50, 64, 16384, 0}};
  for (const Shape3& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "m=" << s.m << " n=" << s.n << " k=" << s.k);
    Operands o;
    Make(*gpu, s.m, s.k, s.k + s.ld_extra, 10 + s.m, &o.x_host, &o.x);
    Make(*gpu, s.n, s.k, s.k + s.ld_extra, 20 + s.n, &o.w_host, &o.w);
    Tensor y = Tensor::Empty({s.m, s.n}, DType::kBF16, gpu->allocator()).value();
    ASSERT_TRUE(Matmul(*gpu, y, o.x, o.w, false, true).ok());
    const Tensor got = HostF32(y);
    EXPECT_TRUE(testing::AllClose(got, Reference(o.x_host, o.w_host), {0.1, 1e-2}));
    // Repeatable bit for bit (split-K sums its slices in a fixed order).
    Tensor y2 = Tensor::Empty({s.m, s.n}, DType::kBF16, gpu->allocator()).value();
    ASSERT_TRUE(Matmul(*gpu, y2, o.x, o.w, false, true).ok());
    EXPECT_TRUE(testing::BitwiseEqual(HostF32(y2), got));
  }
}

TEST(SkinnyGemmGpu, GraphReplaysOfSplitKEqualEagerLaunches) {
  TANDEM_SKIP_WITHOUT_GPU();
  auto gpu = Context::Cuda(0).value();
  const int64_t m = 32, n = 2048, k = 5632;  // split-K
  Operands o;
  Make(*gpu, m, k, k, 1, &o.x_host, &o.x);
  Make(*gpu, n, k, k, 2, &o.w_host, &o.w);
  Tensor y = Tensor::Empty({m, n}, DType::kBF16, gpu->allocator()).value();
  ASSERT_TRUE(Matmul(*gpu, y, o.x, o.w, false, true).ok());  // eager first: workspace allocated
  StatusOr<CudaGraph> g =
      CudaGraph::Capture(*gpu, 1 << 20, [&] { return Matmul(*gpu, y, o.x, o.w, false, true); });
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  for (uint64_t round = 0; round < 3; ++round) {
    Tensor fresh_host, fresh;
    Make(*gpu, m, k, k, 30 + round, &fresh_host, &fresh);
    TANDEM_CHECK_OK(CopyTensor(o.x, fresh, gpu->stream()));
    ASSERT_TRUE(g->Launch(*gpu).ok());
    const Tensor replayed = HostF32(y);
    ASSERT_TRUE(Matmul(*gpu, y, o.x, o.w, false, true).ok());
    EXPECT_TRUE(testing::BitwiseEqual(replayed, HostF32(y))) << "round " << round;
    EXPECT_TRUE(testing::AllClose(replayed, Reference(fresh_host, o.w_host), {0.1, 1e-2}));
  }
}

}  // namespace
}  // namespace tandem::ops
