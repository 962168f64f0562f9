// CPU paged attention: K/V scattered over shuffled pages by PagedKvWrite, ragged decode and
// prefill-chunk queries with GQA, against plain causal AttentionForward per request; validation.
#include <gtest/gtest.h>

#include <cmath>

#include "tests/ops/paged_attention_case.h"

namespace tandem::ops {
namespace {

Tensor RunPaged(Context& ctx, const PagedCase& c) {
  Tensor kv = testing::RandomUniform({c.pages, c.page_elems}, 99);  // garbage where unwritten
  TANDEM_CHECK_OK(PagedKvWrite(ctx, kv, c.k_rows, c.v_rows, c.slot, c.block_tokens));
  Tensor out = Tensor::Cpu(c.q.shape(), DType::kF32);
  TANDEM_CHECK_OK(PagedAttention(ctx, out, c.q, kv, c.block_table, c.req, c.pos, c.hkv,
                                 c.block_tokens, 1.0f / std::sqrt(static_cast<float>(c.d))));
  return out;
}

TEST(PagedAttention, MatchesPlainAttentionDecodeAndPrefill) {
  auto ctx = Context::Cpu();
  // Decode (1 query), prefill chunks (several), a request whose length is a block multiple.
  const PagedCase c = MakePagedCase(7, {1, 9, 8, 13, 5}, {1, 1, 8, 4, 2}, 4, 2, 16, 4);
  EXPECT_TRUE(testing::AllClose(RunPaged(*ctx, c), c.expected, {1e-5, 1e-4}));
  const PagedCase mha = MakePagedCase(8, {6, 17}, {3, 1}, 3, 3, 8, 8);
  EXPECT_TRUE(testing::AllClose(RunPaged(*ctx, mha), mha.expected, {1e-5, 1e-4}));
}

TEST(PagedAttention, RejectsBadArguments) {
  auto ctx = Context::Cpu();
  PagedCase c = MakePagedCase(3, {5, 3}, {1, 1}, 4, 2, 8, 4);
  Tensor kv = Tensor::CpuZeros({c.pages, c.page_elems}, DType::kF32);
  Tensor small = Tensor::CpuZeros({c.pages, 2 * 4 * 2 * 8 - 1}, DType::kF32);
  EXPECT_EQ(PagedKvWrite(*ctx, small, c.k_rows, c.v_rows, c.slot, 4).code(),
            StatusCode::kInvalidArgument);
  Tensor bad_slot = Tensor::CpuZeros(c.slot.shape(), DType::kI32);
  bad_slot.data<int32_t>()[1] = static_cast<int32_t>(c.pages * 4);
  EXPECT_EQ(PagedKvWrite(*ctx, kv, c.k_rows, c.v_rows, bad_slot, 4).code(),
            StatusCode::kInvalidArgument);
  Tensor out = Tensor::Cpu(c.q.shape(), DType::kF32);
  EXPECT_EQ(PagedAttention(*ctx, out, c.q, kv, c.block_table, c.req, c.pos, 3, 4, 1.0f).code(),
            StatusCode::kInvalidArgument);  // Hq % Hkv != 0
  Tensor far = Tensor::CpuZeros(c.pos.shape(), DType::kI32);
  far.data<int32_t>()[0] = static_cast<int32_t>(c.max_blocks * 4);
  EXPECT_EQ(PagedAttention(*ctx, out, c.q, kv, c.block_table, c.req, far, 2, 4, 1.0f).code(),
            StatusCode::kInvalidArgument);
}

// The fused RoPE + KV write: the rotated k heads (the last kv_heads of qk) and v land in the
// pages, q and k rotate in place as Rope does; bad arguments are named.
TEST(PagedAttention, RopeKvWriteWritesTheRotatedKHeads) {
  auto ctx = Context::Cpu();
  const int64_t n = 5, hq = 4, hkv = 2, d = 8, block = 4, pages = 3;
  Tensor qk = testing::RandomUniform({n, hq + hkv, d}, 12);
  const Tensor v = testing::RandomUniform({n, hkv, d}, 13);
  Tensor kv = Tensor::CpuZeros({pages, 2 * block * hkv * d}, DType::kF32);
  Tensor pos = Tensor::Cpu({n}, DType::kI32), slot = Tensor::Cpu({n}, DType::kI32);
  const int32_t slots[n] = {7, 0, 11, 3, 4};
  for (int64_t i = 0; i < n; ++i) {
    pos.data<int32_t>()[i] = static_cast<int32_t>(10 * i + 1);
    slot.data<int32_t>()[i] = slots[i];
  }
  Tensor inv_freq = Tensor::Cpu({d / 2}, DType::kF32);
  for (int64_t i = 0; i < d / 2; ++i) inv_freq.data<float>()[i] = 1.0f / static_cast<float>(i + 1);
  Tensor want = Tensor::Cpu(qk.shape(), DType::kF32);
  ASSERT_TRUE(Rope(*ctx, want, qk, pos, inv_freq, false).ok());
  ASSERT_TRUE(RopePagedKvWrite(*ctx, qk, kv, v, pos, inv_freq, slot, hkv, block).ok());
  EXPECT_TRUE(testing::AllClose(qk, want, {0.0, 0.0}));
  const float* pages_f = kv.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t page = slots[i] / block, t = slots[i] % block;
    for (int64_t e = 0; e < hkv * d; ++e) {
      const float k_page = pages_f[page * kv.dim(1) + t * hkv * d + e];
      const float v_page = pages_f[page * kv.dim(1) + (block + t) * hkv * d + e];
      ASSERT_EQ(k_page, want.data<float>()[(i * (hq + hkv) + hq) * d + e]) << i << " " << e;
      ASSERT_EQ(v_page, v.data<float>()[i * hkv * d + e]) << i << " " << e;
    }
  }
  // kv_heads must leave at least one q head; D even; v [N, Hkv, D].
  Status s = RopePagedKvWrite(*ctx, qk, kv, v, pos, inv_freq, slot, hq + hkv, block);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("kv_heads"), std::string::npos) << s.ToString();
  Tensor odd = testing::RandomUniform({n, hq + hkv, d - 1}, 14);
  EXPECT_EQ(RopePagedKvWrite(*ctx, odd, kv, v, pos, inv_freq, slot, hkv, block).code(),
            StatusCode::kInvalidArgument);
  const Tensor v_bad = testing::RandomUniform({n, hkv + 1, d}, 15);
  s = RopePagedKvWrite(*ctx, qk, kv, v_bad, pos, inv_freq, slot, hkv, block);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'v'"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace tandem::ops
