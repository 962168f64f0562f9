// CPU reference of the paged KV cache ops (ops/paged_attention.h): plain loops, one (token, query
// head) at a time. Scores are f32 dot products summed over d in order; the softmax denominator is
// summed in f64 and rounded once; the weighted sum of V is f32 in increasing position order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/status.h"
#include "ops/internal/paged_attention_kernels.h"

namespace tandem::ops::cpu {

void PagedKvWrite(const PagedShape& s, float* kv, const float* k, const float* v,
                  const int32_t* slot) {
  const int64_t row = s.kv_heads * s.head_dim;  // one position of K (or V)
  for (int64_t n = 0; n < s.tokens; ++n) {
    const int64_t page = slot[n] / s.block_tokens, t = slot[n] % s.block_tokens;
    float* kp = kv + page * s.page_stride + t * row;
    float* vp = kp + s.block_tokens * row;
    for (int64_t i = 0; i < row; ++i) {
      kp[i] = k[n * s.q_stride + i];
      vp[i] = v[n * s.o_stride + i];
    }
  }
}

void PagedAttention(const PagedShape& s, float* out, const float* q, const float* kv,
                    const int32_t* block_table, const int32_t* req, const int32_t* pos,
                    float scale) {
  const int64_t D = s.head_dim, row = s.kv_heads * D, group = s.q_heads / s.kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t nh = 0; nh < s.tokens * s.q_heads; ++nh) {
    const int64_t n = nh / s.q_heads, h = nh % s.q_heads, kvh = h / group;
    const float* qn = q + n * s.q_stride + h * D;
    const int32_t* table = block_table + static_cast<int64_t>(req[n]) * s.max_blocks;
    const int64_t len = static_cast<int64_t>(pos[n]) + 1;
    TANDEM_CHECK_MSG((len - 1) / s.block_tokens < s.max_blocks, "position ", pos[n],
                     " beyond the block table (", s.max_blocks, " blocks)");
    std::vector<float> scores(len);
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) {
      const float* kj =
          kv + table[j / s.block_tokens] * s.page_stride + (j % s.block_tokens) * row + kvh * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qn[d] * kj[d];
      scores[j] = scale * dot;
      max_score = std::max(max_score, scores[j]);
    }
    double denom = 0.0;
    for (int64_t j = 0; j < len; ++j) {
      scores[j] = std::exp(scores[j] - max_score);
      denom += scores[j];
    }
    const float inv = static_cast<float>(1.0 / denom);
    float* on = out + n * s.o_stride + h * D;
    for (int64_t d = 0; d < D; ++d) on[d] = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      const float* vj = kv + table[j / s.block_tokens] * s.page_stride + s.block_tokens * row +
                        (j % s.block_tokens) * row + kvh * D;
      const float p = scores[j] * inv;
      for (int64_t d = 0; d < D; ++d) on[d] += p * vj[d];
    }
  }
}

}  // namespace tandem::ops::cpu
