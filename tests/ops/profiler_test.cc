// ops::Profiler on a CPU context: per-category calls, times and flops of real ops, only the
// outermost of nested regions counted, regions never more than the window, the gap holding the
// unlabelled time, misuse refused, and the profiler reusable and detached when done.
#include "ops/profiler.h"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "ops/ops.h"
#include "tests/common/testing.h"

namespace tandem::ops {
namespace {

using testing::RandomUniform;

void SleepMs(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// What every report must satisfy: the categories add up to regions_ms, which fits in the window,
// and the gap is the rest.
void ExpectConsistent(const ProfileReport& r) {
  double sum = 0;
  for (const ProfileEntry& e : r.entries) {
    EXPECT_GT(e.calls, 0) << e.name;
    EXPECT_GE(e.total_ms, 0.0) << e.name;
    sum += e.total_ms;
  }
  EXPECT_NEAR(r.regions_ms, sum, 1e-9);
  EXPECT_LE(r.regions_ms, r.wall_ms);
  EXPECT_NEAR(r.gap_ms, r.wall_ms - r.regions_ms, 1e-9);
  for (size_t i = 1; i < r.entries.size(); ++i) {
    EXPECT_GE(r.entries[i - 1].total_ms, r.entries[i].total_ms) << "entries sorted by time";
  }
}

TEST(ProfilerTest, ContextHasNoProfilerByDefault) {
  auto ctx = Context::Cpu();
  EXPECT_EQ(ctx->profiler(), nullptr);
  Tensor x = RandomUniform({8}, 1);
  ASSERT_TRUE(Scale(*ctx, x, 2.0f).ok());  // a scope with no profiler does nothing
  EXPECT_EQ(ctx->profiler(), nullptr);
}

TEST(ProfilerTest, CountsCallsTimesAndGemmFlopsPerCategory) {
  auto ctx = Context::Cpu();
  const int64_t m = 96, n = 80, k = 128;
  Tensor a = RandomUniform({m, k}, 2), b = RandomUniform({k, n}, 3);
  Tensor c = Tensor::Cpu({m, n}, DType::kF32);
  Tensor y = Tensor::Cpu({m, k}, DType::kF32), rstd = Tensor::Cpu({m}, DType::kF32);
  Tensor w = RandomUniform({k}, 4);

  Profiler prof;
  ASSERT_TRUE(prof.Begin(*ctx).ok());
  EXPECT_EQ(ctx->profiler(), &prof);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Matmul(*ctx, c, a, b, false, false).ok());
  ASSERT_TRUE(Fill(*ctx, c, 0.5f).ok());
  ASSERT_TRUE(Scale(*ctx, c, 2.0f).ok());
  ASSERT_TRUE(RmsNormForward(*ctx, y, rstd, a, w, 1e-5f).ok());
  SleepMs(20);  // unlabelled time: the gap
  ASSERT_TRUE(prof.End().ok());
  EXPECT_EQ(ctx->profiler(), nullptr);
  ASSERT_TRUE(Scale(*ctx, c, 2.0f).ok());  // after End: not counted

  StatusOr<ProfileReport> r = prof.Collect();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(r->cuda);
  ASSERT_EQ(r->entries.size(), 3u);
  const ProfileEntry* gemm = r->Find("gemm");
  const ProfileEntry* elementwise = r->Find("elementwise");
  const ProfileEntry* norm = r->Find("norm");
  ASSERT_NE(gemm, nullptr);
  ASSERT_NE(elementwise, nullptr);
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(r->Find("attention_fwd"), nullptr);
  EXPECT_EQ(gemm->calls, 3);
  EXPECT_EQ(elementwise->calls, 2);
  EXPECT_EQ(norm->calls, 1);
  EXPECT_GT(gemm->total_ms, 0.0);
  EXPECT_DOUBLE_EQ(gemm->flops, 3.0 * 2.0 * m * n * k);
  EXPECT_GT(gemm->Tflops(), 0.0);
  EXPECT_EQ(elementwise->flops, 0.0);
  EXPECT_EQ(elementwise->Tflops(), 0.0);
  EXPECT_GE(r->gap_ms, 20.0);
  EXPECT_GE(r->wall_ms, r->regions_ms + 20.0);
  EXPECT_DOUBLE_EQ(r->wall_ms, r->host_ms);
  ExpectConsistent(*r);

  const std::string table = r->ToTable();
  for (const char* word : {"category", "gemm", "elementwise", "norm", "(gap)", "step (wall)"}) {
    EXPECT_NE(table.find(word), std::string::npos) << word << " missing from\n" << table;
  }
}

TEST(ProfilerTest, NestedRegionsCountOnlyTheOutermost) {
  auto ctx = Context::Cpu();
  Tensor a = RandomUniform({16, 16}, 5), c = Tensor::Cpu({16, 16}, DType::kF32);
  Profiler prof;
  ASSERT_TRUE(prof.Begin(*ctx).ok());
  {
    ProfileScope outer(*ctx, "outer");
    {
      ProfileScope inner(*ctx, "inner");
      SleepMs(5);
    }
    ASSERT_TRUE(Matmul(*ctx, c, a, a, false, true).ok());  // an op inside an op
    SleepMs(5);
  }
  ASSERT_TRUE(Matmul(*ctx, c, a, a, false, false).ok());  // outermost again
  ASSERT_TRUE(prof.End().ok());
  StatusOr<ProfileReport> r = prof.Collect();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->entries.size(), 2u);
  EXPECT_EQ(r->Find("inner"), nullptr);
  const ProfileEntry* outer = r->Find("outer");
  const ProfileEntry* gemm = r->Find("gemm");
  ASSERT_NE(outer, nullptr);
  ASSERT_NE(gemm, nullptr);
  EXPECT_EQ(outer->calls, 1);
  EXPECT_GE(outer->total_ms, 10.0);                    // both sleeps are inside it
  EXPECT_DOUBLE_EQ(outer->flops, 2.0 * 16 * 16 * 16);  // the nested GEMM's flops go to it
  EXPECT_EQ(gemm->calls, 1);
  EXPECT_EQ(r->entries[0].name, "outer");
  ExpectConsistent(*r);
}

TEST(ProfilerTest, AttentionReportsFlopsOfTheVisiblePairs) {
  auto ctx = Context::Cpu();
  const int64_t b = 2, t = 5, hq = 4, hkv = 2, d = 8;
  Tensor q = RandomUniform({b, t, hq, d}, 7), k = RandomUniform({b, t, hkv, d}, 8),
         v = RandomUniform({b, t, hkv, d}, 9);
  Tensor out = Tensor::Cpu({b, t, hq, d}, DType::kF32), lse = Tensor::Cpu({b, hq, t}, DType::kF32);
  Tensor segments = Tensor::Cpu({b, t}, DType::kI32);
  for (int64_t i = 0; i < b * t; ++i) segments.data<int32_t>()[i] = 0;
  Profiler prof;
  ASSERT_TRUE(prof.Begin(*ctx).ok());
  ASSERT_TRUE(AttentionForward(*ctx, out, lse, q, k, v, 0.3f).ok());
  ASSERT_TRUE(AttentionBlockForward(*ctx, out, lse, q, k, v, 0.3f, AttentionMask::kFull).ok());
  ASSERT_TRUE(AttentionForward(*ctx, out, lse, q, k, v, 0.3f, segments).ok());  // not counted
  Tensor dq = Tensor::Cpu({b, t, hq, d}, DType::kF32),
         dk = Tensor::Cpu({b, t, hkv, d}, DType::kF32),
         dv = Tensor::Cpu({b, t, hkv, d}, DType::kF32);
  ASSERT_TRUE(AttentionBackward(*ctx, dq, dk, dv, out, q, k, v, out, lse, 0.3f).ok());
  ASSERT_TRUE(prof.End().ok());
  StatusOr<ProfileReport> r = prof.Collect();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const ProfileEntry* fwd = r->Find("attention_fwd");
  const ProfileEntry* bwd = r->Find("attention_bwd");
  ASSERT_NE(fwd, nullptr);
  ASSERT_NE(bwd, nullptr);
  EXPECT_EQ(fwd->calls, 3);
  EXPECT_EQ(bwd->calls, 1);
  // 4 * D per visible (query, key) pair and query head: 15 causal pairs, 25 with the full mask.
  const double per_pair = 4.0 * b * hq * d;
  EXPECT_DOUBLE_EQ(fwd->flops, per_pair * (15 + 25));
  EXPECT_DOUBLE_EQ(bwd->flops, 2.5 * per_pair * 15);
  ExpectConsistent(*r);
}

TEST(ProfilerTest, MisuseIsRefused) {
  auto ctx = Context::Cpu();
  Profiler prof;
  EXPECT_EQ(prof.End().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(prof.Collect().status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(prof.Begin(*ctx).ok());
  EXPECT_EQ(prof.Begin(*ctx).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(prof.Collect().status().code(), StatusCode::kFailedPrecondition);  // still open
  Profiler other;
  EXPECT_EQ(other.Begin(*ctx).code(), StatusCode::kFailedPrecondition);  // ctx is taken
  EXPECT_EQ(ctx->profiler(), &prof);
  ASSERT_TRUE(prof.End().ok());
  EXPECT_EQ(prof.Begin(*ctx).code(), StatusCode::kFailedPrecondition);  // not collected yet
  ASSERT_TRUE(prof.Collect().ok());
  EXPECT_EQ(prof.Collect().status().code(), StatusCode::kFailedPrecondition);
}

TEST(ProfilerTest, ReusedWindowsStartFresh) {
  auto ctx = Context::Cpu();
  Tensor x = RandomUniform({64}, 6);
  Profiler prof;
  for (int window = 1; window <= 3; ++window) {
    ASSERT_TRUE(prof.Begin(*ctx).ok());
    for (int i = 0; i < window; ++i) ASSERT_TRUE(Scale(*ctx, x, 1.5f).ok());
    ASSERT_TRUE(prof.End().ok());
    StatusOr<ProfileReport> r = prof.Collect();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(r->entries.size(), 1u);
    EXPECT_EQ(r->entries[0].name, "elementwise");
    EXPECT_EQ(r->entries[0].calls, window);
    ExpectConsistent(*r);
  }
}

TEST(ProfilerTest, DestroyingAnOpenProfilerDetachesIt) {
  auto ctx = Context::Cpu();
  {
    Profiler prof;
    ASSERT_TRUE(prof.Begin(*ctx).ok());
    EXPECT_EQ(ctx->profiler(), &prof);
  }
  EXPECT_EQ(ctx->profiler(), nullptr);
}

}  // namespace
}  // namespace tandem::ops
