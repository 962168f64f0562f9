// CUDA paged attention and KV write against the CPU reference on the same bf16-rounded inputs
// (and f32), ragged decode + prefill-chunk queries with GQA, D in {64, 128}.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "tests/ops/paged_attention_case.h"

namespace tandem::ops {
namespace {

// Host f32 -> device tensor of dtype, and the host f32 values that tensor holds.
Tensor ToDevice(Context& gpu, const Tensor& host, DType dtype, Tensor* rounded) {
  Tensor cast = CastCpu(host, dtype).value();
  *rounded = CastCpu(cast, DType::kF32).value();
  return CopyToDeviceBlocking(cast, gpu.allocator()).value();
}

// page_slack 5 leaves K/V rows unaligned (the per-head kernel); 16 keeps them 16-byte aligned, so
// GQA groups of 1, 2, 4 and 8 take the grouped kernel.
// lens / queries: each request's length and how many of its last tokens query (the default: a
// decode-sized batch of 27 queries; the grouped kernel takes 16-warp blocks below 1024
// (token, kv head) pairs and 4-warp blocks above).
void RunCase(DType dtype, int64_t d, testing::Tolerance tol, int64_t hq = 8, int64_t hkv = 2,
             int64_t page_slack = 5, std::vector<int64_t> lens = {1, 33, 70, 9},
             std::vector<int64_t> queries = {1, 1, 16, 9}) {
  SCOPED_TRACE(::testing::Message()
               << DTypeName(dtype) << " D=" << d << " Hq=" << hq << " Hkv=" << hkv
               << " slack=" << page_slack << " requests=" << lens.size());
  auto cpu = Context::Cpu();
  auto gpu = Context::Cuda(0).value();
  const PagedCase c =
      MakePagedCase(11 + d + hq, std::move(lens), std::move(queries), hq, hkv, d, 16, page_slack);
  Tensor q_r, k_r, v_r, junk;
  Tensor q = ToDevice(*gpu, c.q, dtype, &q_r);
  Tensor k = ToDevice(*gpu, c.k_rows, dtype, &k_r);
  Tensor v = ToDevice(*gpu, c.v_rows, dtype, &v_r);
  Tensor kv = ToDevice(*gpu, testing::RandomUniform({c.pages, c.page_elems}, 5), dtype, &junk);
  auto dev = [&](const Tensor& t) { return CopyToDeviceBlocking(t, gpu->allocator()).value(); };
  Tensor slot = dev(c.slot), table = dev(c.block_table), req = dev(c.req), pos = dev(c.pos);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_TRUE(PagedKvWrite(*gpu, kv, k, v, slot, c.block_tokens).ok());
  Tensor out = Tensor::Empty(c.q.shape(), dtype, gpu->allocator()).value();
  ASSERT_TRUE(PagedAttention(*gpu, out, q, kv, table, req, pos, c.hkv, c.block_tokens, scale).ok());
  Tensor got = CopyToHostBlocking(out).value();
  // The reference on the same rounded inputs.
  Tensor kv_ref = junk;
  ASSERT_TRUE(PagedKvWrite(*cpu, kv_ref, k_r, v_r, c.slot, c.block_tokens).ok());
  Tensor want = Tensor::Cpu(c.q.shape(), DType::kF32);
  ASSERT_TRUE(PagedAttention(*cpu, want, q_r, kv_ref, c.block_table, c.req, c.pos, c.hkv,
                             c.block_tokens, scale)
                  .ok());
  EXPECT_TRUE(testing::AllClose(CastCpu(got, DType::kF32).value(), want, tol));
  // The KV pages themselves: every written element equal (a copy, no rounding).
  Tensor kv_host = CastCpu(CopyToHostBlocking(kv).value(), DType::kF32).value();
  EXPECT_TRUE(testing::AllClose(kv_host, kv_ref, {0.0, 0.0}));
}

TEST(PagedAttentionGpu, MatchesCpuBf16) {
  TANDEM_SKIP_WITHOUT_GPU();
  RunCase(DType::kBF16, 64, {1e-2, 2e-2});
  RunCase(DType::kBF16, 128, {1e-2, 2e-2});
}

TEST(PagedAttentionGpu, MatchesCpuF32) {
  TANDEM_SKIP_WITHOUT_GPU();
  RunCase(DType::kF32, 64, {1e-5, 1e-4});
}

// The grouped kernel (aligned pages) for every GQA group size it takes (1, 2, 4, 8) and row
// size (4 to 32 16-byte vectors), and the per-head kernel for the shapes it does not take (a
// group of 3, 24 f32 vectors per row, 64 f32 vectors per row).
TEST(PagedAttentionGpu, GroupedAndPlainKernelsMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const testing::Tolerance bf16{1e-2, 2e-2}, f32{1e-5, 1e-4};
  for (int64_t g : {1, 2, 4, 8}) RunCase(DType::kBF16, 64, bf16, 2 * g, 2, 16);
  RunCase(DType::kBF16, 128, bf16, 8, 2, 16);
  RunCase(DType::kBF16, 32, bf16, 8, 1, 16);
  RunCase(DType::kBF16, 256, bf16, 16, 2, 16);
  RunCase(DType::kF32, 64, f32, 8, 2, 16);
  RunCase(DType::kF32, 128, f32, 8, 1, 16);
  RunCase(DType::kBF16, 64, bf16, 6, 2, 16);  // per-head: group of 3
  RunCase(DType::kF32, 96, f32, 4, 2, 16);    // per-head: 24 vectors per row
  RunCase(DType::kF32, 256, f32, 4, 4, 16);   // per-head: 64 vectors per row
}

// Prefill-sized batches (over 1024 (token, kv head) pairs): the grouped kernel's 4-warp blocks.
TEST(PagedAttentionGpu, PrefillSizedBatchesMatchCpu) {
  TANDEM_SKIP_WITHOUT_GPU();
  const testing::Tolerance bf16{1e-2, 2e-2}, f32{1e-5, 1e-4};
  const std::vector<int64_t> lens = {300, 257, 41, 600}, queries = {300, 200, 41, 97};
  RunCase(DType::kBF16, 64, bf16, 8, 2, 16, lens, queries);
  RunCase(DType::kBF16, 128, bf16, 16, 2, 16, lens, queries);
  RunCase(DType::kF32, 64, f32, 8, 2, 16, lens, queries);
}

// RopePagedKvWrite: bitwise Rope followed by PagedKvWrite on the GPU (the rotated q and k in
// qkv, every page element), and the CPU reference within rounding. qk and v are views of one
// fused qkv buffer as in the serving forward; odd token counts and page sizes, shuffled slots.
void RunRopeKvCase(DType dtype, int64_t n, int64_t hq, int64_t hkv, int64_t d, int64_t block_tokens,
                   testing::Tolerance tol) {
  SCOPED_TRACE(::testing::Message() << DTypeName(dtype) << " N=" << n << " Hq=" << hq
                                    << " Hkv=" << hkv << " D=" << d << " block=" << block_tokens);
  auto cpu = Context::Cpu();
  auto gpu = Context::Cuda(0).value();
  const int64_t h3 = hq + 2 * hkv, pages = (n + block_tokens - 1) / block_tokens + 2;
  const int64_t page_elems = 2 * block_tokens * hkv * d + 3;
  std::mt19937 rng(static_cast<uint32_t>(n * 131 + d + hq));
  std::vector<int32_t> slots(static_cast<size_t>(pages * block_tokens));
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  Tensor slot = Tensor::Cpu({n}, DType::kI32), pos = Tensor::Cpu({n}, DType::kI32);
  for (int64_t i = 0; i < n; ++i) {
    slot.data<int32_t>()[i] = slots[static_cast<size_t>(i)];
    pos.data<int32_t>()[i] = static_cast<int32_t>(rng() % 5000);
  }
  Tensor inv_freq = Tensor::Cpu({d / 2}, DType::kF32);
  for (int64_t i = 0; i < d / 2; ++i) {
    inv_freq.data<float>()[i] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / d);
  }
  Tensor qkv_r, kv_r;
  const Tensor qkv_host = testing::RandomUniform({n, h3, d}, 40 + d);
  const Tensor kv_host = testing::RandomUniform({pages, page_elems}, 41 + d);
  Tensor qkv_fused = ToDevice(*gpu, qkv_host, dtype, &qkv_r);
  Tensor qkv_split = ToDevice(*gpu, qkv_host, dtype, &qkv_r);
  Tensor kv_fused = ToDevice(*gpu, kv_host, dtype, &kv_r);
  Tensor kv_split = ToDevice(*gpu, kv_host, dtype, &kv_r);
  auto dev = [&](const Tensor& t) { return CopyToDeviceBlocking(t, gpu->allocator()).value(); };
  const Tensor d_slot = dev(slot), d_pos = dev(pos), d_freq = dev(inv_freq);

  Tensor qk = qkv_fused.Slice(1, 0, hq + hkv);
  const Tensor v = qkv_fused.Slice(1, hq + hkv, h3);
  const Status fused =
      RopePagedKvWrite(*gpu, qk, kv_fused, v, d_pos, d_freq, d_slot, hkv, block_tokens);
  ASSERT_TRUE(fused.ok()) << fused.ToString();
  Tensor qk2 = qkv_split.Slice(1, 0, hq + hkv);
  ASSERT_TRUE(Rope(*gpu, qk2, qk2, d_pos, d_freq, false).ok());
  const Tensor k2 = qkv_split.Slice(1, hq, hq + hkv), v2 = qkv_split.Slice(1, hq + hkv, h3);
  ASSERT_TRUE(PagedKvWrite(*gpu, kv_split, k2, v2, d_slot, block_tokens).ok());
  const Tensor got_qkv = CopyToHostBlocking(qkv_fused).value();
  const Tensor want_qkv = CopyToHostBlocking(qkv_split).value();
  const Tensor got_kv = CopyToHostBlocking(kv_fused).value();
  const Tensor want_kv = CopyToHostBlocking(kv_split).value();
  EXPECT_EQ(std::memcmp(got_qkv.raw_data(), want_qkv.raw_data(),
                        static_cast<size_t>(got_qkv.num_bytes())),
            0)
      << "qkv differs from Rope's";
  EXPECT_EQ(
      std::memcmp(got_kv.raw_data(), want_kv.raw_data(), static_cast<size_t>(got_kv.num_bytes())),
      0)
      << "pages differ from PagedKvWrite's";

  // The CPU reference on the same rounded inputs.
  Tensor qk_r = qkv_r.Slice(1, 0, hq + hkv);
  const Tensor v_r = qkv_r.Slice(1, hq + hkv, h3);
  ASSERT_TRUE(RopePagedKvWrite(*cpu, qk_r, kv_r, v_r, pos, inv_freq, slot, hkv, block_tokens).ok());
  EXPECT_TRUE(testing::AllClose(CastCpu(got_qkv, DType::kF32).value(), qkv_r, tol));
  EXPECT_TRUE(testing::AllClose(CastCpu(got_kv, DType::kF32).value(), kv_r, tol));
}

TEST(PagedAttentionGpu, RopeKvWriteIsBitwiseRopeThenKvWrite) {
  TANDEM_SKIP_WITHOUT_GPU();
  const testing::Tolerance bf16{1e-2, 1e-2}, f32{1e-5, 1e-5};
  RunRopeKvCase(DType::kBF16, 32, 32, 4, 64, 16, bf16);  // the 1.1B model's decode step
  RunRopeKvCase(DType::kBF16, 1, 8, 2, 128, 16, bf16);
  RunRopeKvCase(DType::kBF16, 33, 3, 1, 96, 5, bf16);
  RunRopeKvCase(DType::kBF16, 300, 16, 8, 128, 7, bf16);  // a prefill chunk
  RunRopeKvCase(DType::kF32, 7, 6, 2, 64, 3, f32);
  RunRopeKvCase(DType::kF32, 17, 4, 4, 34, 16, f32);  // MHA, D not a multiple of 32
}

}  // namespace
}  // namespace tandem::ops
