// A random ragged paged-attention case shared by the CPU and GPU paged attention tests: R requests
// with their K/V scattered over shuffled pages of a pool, query tokens at the last positions of
// each request (one for decode, several for a prefill chunk), and the plain AttentionForward
// result of every request as the reference.
#pragma once

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "ops/ops.h"
#include "ops/paged_attention.h"
#include "tests/common/testing.h"

namespace tandem::ops {

struct PagedCase {
  int64_t hq = 4, hkv = 2, d = 32, block_tokens = 4, pages = 0, page_elems = 0, max_blocks = 0;
  std::vector<int64_t> lens;      // cached positions per request
  std::vector<int64_t> queries;   // query tokens per request (the last positions)
  Tensor q_full, k_full, v_full;  // per request concatenated [sum lens, H, D]
  Tensor q, k_rows, v_rows;       // q [N, Hq, D] for the query tokens; K/V rows [sum lens, Hkv, D]
  Tensor slot, req, pos, block_table;  // host i32
  Tensor expected;                     // [N, Hq, D]
};

// Builds the case on the host (f32) and the reference with the CPU AttentionForward.
// page_slack: elements of each page past the K and V of its block.
inline PagedCase MakePagedCase(uint64_t seed, std::vector<int64_t> lens,
                               std::vector<int64_t> queries, int64_t hq, int64_t hkv, int64_t d,
                               int64_t block_tokens, int64_t page_slack = 5) {
  PagedCase c;
  c.hq = hq, c.hkv = hkv, c.d = d, c.block_tokens = block_tokens;
  c.lens = lens, c.queries = queries;
  const int64_t R = lens.size();
  int64_t total = 0, n = 0;
  for (int64_t r = 0; r < R; ++r) {
    total += lens[r];
    n += queries[r];
    c.max_blocks = std::max(c.max_blocks, (lens[r] + block_tokens - 1) / block_tokens);
  }
  c.q_full = testing::RandomUniform({total, hq, d}, seed);
  c.k_rows = testing::RandomUniform({total, hkv, d}, seed + 1);
  c.v_rows = testing::RandomUniform({total, hkv, d}, seed + 2);
  // Pages: every block of every request gets a distinct page, in shuffled order, plus spares.
  std::vector<int32_t> page_ids(R * c.max_blocks + 3);
  std::iota(page_ids.begin(), page_ids.end(), 0);
  std::shuffle(page_ids.begin(), page_ids.end(), std::mt19937(static_cast<uint32_t>(seed)));
  c.pages = page_ids.size();
  // Slack: page stride != used bytes. 5 elements leave rows unaligned (the CUDA per-head kernel);
  // a multiple of 8 keeps every row 16-byte aligned (the grouped kernel's vector loads).
  c.page_elems = 2 * block_tokens * hkv * d + page_slack;
  c.block_table = Tensor::CpuZeros({R, c.max_blocks}, DType::kI32);
  for (int64_t i = 0; i < R * c.max_blocks; ++i) c.block_table.data<int32_t>()[i] = page_ids[i];
  c.slot = Tensor::Cpu({total}, DType::kI32);
  c.q = Tensor::Cpu({n, hq, d}, DType::kF32);
  c.req = Tensor::Cpu({n}, DType::kI32);
  c.pos = Tensor::Cpu({n}, DType::kI32);
  c.expected = Tensor::Cpu({n, hq, d}, DType::kF32);
  auto ctx = Context::Cpu();
  int64_t row = 0, qi = 0;
  const int64_t qrow = hq * d;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t T = lens[r];
    for (int64_t t = 0; t < T; ++t) {
      const int32_t page = c.block_table.data<int32_t>()[r * c.max_blocks + t / block_tokens];
      c.slot.data<int32_t>()[row + t] =
          static_cast<int32_t>(page * block_tokens + t % block_tokens);
    }
    Tensor qr = c.q_full.Slice(0, row, row + T).View({1, T, hq, d});
    Tensor kr = c.k_rows.Slice(0, row, row + T).View({1, T, hkv, d});
    Tensor vr = c.v_rows.Slice(0, row, row + T).View({1, T, hkv, d});
    Tensor out = Tensor::Cpu({1, T, hq, d}, DType::kF32);
    Tensor lse = Tensor::Cpu({1, hq, T}, DType::kF32);
    TANDEM_CHECK_OK(AttentionForward(*ctx, out, lse, qr, kr, vr, 1.0f / std::sqrt(float(d))));
    for (int64_t t = T - queries[r]; t < T; ++t, ++qi) {
      std::copy_n(qr.data<float>() + t * qrow, qrow, c.q.data<float>() + qi * qrow);
      std::copy_n(out.data<float>() + t * qrow, qrow, c.expected.data<float>() + qi * qrow);
      c.req.data<int32_t>()[qi] = static_cast<int32_t>(r);
      c.pos.data<int32_t>()[qi] = static_cast<int32_t>(t);
    }
    row += T;
  }
  return c;
}

}  // namespace tandem::ops
