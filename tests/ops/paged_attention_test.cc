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

}  // namespace
}  // namespace tandem::ops
