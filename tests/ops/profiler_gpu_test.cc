// ops::Profiler on a CUDA context: CUDA events around real bf16 GEMMs, the GEMM flops and
// TFLOP/s, the stream's idle time (a host sleep between ops) in the gap, events reused across
// windows, and profiled results bitwise equal to unprofiled ones.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "ops/ops.h"
#include "ops/profiler.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

// A bf16 [rows, cols] device tensor of uniform values in [-1, 1).
Tensor DeviceBf16(Context& ctx, int64_t rows, int64_t cols, uint64_t seed) {
  Tensor host = testing::RandomUniform({rows, cols}, seed);
  StatusOr<Tensor> f32 = CopyToDeviceBlocking(host, ctx.allocator());
  TANDEM_CHECK_OK(f32.status());
  StatusOr<Tensor> bf16 = Tensor::Empty({rows, cols}, DType::kBF16, ctx.allocator());
  TANDEM_CHECK_OK(bf16.status());
  TANDEM_CHECK_OK(Cast(ctx, *bf16, *f32));
  return *bf16;
}

TEST(ProfilerGpuTest, TimesGemmsWithEventsAndPutsIdleTimeInTheGap) {
  TANDEM_SKIP_WITHOUT_GPU();
  StatusOr<std::unique_ptr<Context>> made = Context::Cuda(0);
  ASSERT_TRUE(made.ok()) << made.status().ToString();
  Context& ctx = **made;
  const int64_t n = 2048;
  Tensor a = DeviceBf16(ctx, n, n, 1), b = DeviceBf16(ctx, n, n, 2);
  StatusOr<Tensor> c = Tensor::Empty({n, n}, DType::kF32, ctx.allocator());
  StatusOr<Tensor> expected = Tensor::Empty({n, n}, DType::kF32, ctx.allocator());
  ASSERT_TRUE(c.ok() && expected.ok());
  ASSERT_TRUE(Matmul(ctx, *expected, a, b, false, true).ok());  // unprofiled reference

  Profiler prof;
  for (int window = 1; window <= 2; ++window) {  // the second reuses the first's events
    ASSERT_TRUE(prof.Begin(ctx).ok());
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(Matmul(ctx, *c, a, b, false, true).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(30));  // the stream idles
    ASSERT_TRUE(Fill(ctx, *expected, 0.0f).ok());
    ASSERT_TRUE(prof.End().ok());
    StatusOr<ProfileReport> r = prof.Collect();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(r->cuda);
    ASSERT_EQ(r->entries.size(), 2u);
    const ProfileEntry* gemm = r->Find("gemm");
    const ProfileEntry* fill = r->Find("elementwise");
    ASSERT_NE(gemm, nullptr);
    ASSERT_NE(fill, nullptr);
    EXPECT_EQ(gemm->calls, 4);
    EXPECT_EQ(fill->calls, 1);
    EXPECT_GT(gemm->total_ms, 0.0);
    EXPECT_DOUBLE_EQ(gemm->flops, 4.0 * 2.0 * n * n * n);
    // Any GPU this runs on does a 2048^3 bf16 GEMM at between 1 and 5000 TFLOP/s.
    EXPECT_GT(gemm->Tflops(), 1.0);
    EXPECT_LT(gemm->Tflops(), 5000.0);
    EXPECT_GE(r->gap_ms, 25.0) << r->ToTable();
    EXPECT_LE(r->regions_ms, r->wall_ms + 1e-2);
    EXPECT_NEAR(r->gap_ms, std::max(0.0, r->wall_ms - r->regions_ms), 1e-9);
    EXPECT_GE(r->host_ms, 30.0);
    EXPECT_NE(r->ToTable().find("step (stream)"), std::string::npos);
    if (window == 1) {
      // The profiled GEMM gives the unprofiled bytes (recompute the reference, Fill cleared it).
      StatusOr<Tensor> got = CopyToHostBlocking(*c);
      ASSERT_TRUE(Matmul(ctx, *expected, a, b, false, true).ok());
      StatusOr<Tensor> want = CopyToHostBlocking(*expected);
      ASSERT_TRUE(got.ok() && want.ok());
      EXPECT_EQ(std::memcmp(got->raw_data(), want->raw_data(), n * n * sizeof(float)), 0);
    }
  }
}

}  // namespace
}  // namespace tandem::ops
