// CPU grouped-query attention, causal with optional segment ids (packed documents) or, for
// blocks of a context-parallel ring, with every key visible (shape.causal == false).
//
// Plain per (b, h, i) math. Scores s_ij = q_i . k_j are accumulated in f32 over d in order, with
// K packed transposed ([D, T]) so the inner loop runs over contiguous keys; probabilities are
// p_ij = exp(scale * s_ij - lse_i), the same expression in forward and backward. Row sums of exp
// and D_i = dout_i . out_i are accumulated in f64.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/kernels.h"

namespace tandem::ops::cpu {
namespace {

// Pointer to row (b, t, h) of a [B, T, H, D] operand with token stride `ts`.
inline const float* Row(const float* base, const AttentionShape& s, int64_t ts, int64_t b,
                        int64_t t, int64_t h) {
  return base + (b * s.seq + t) * ts + h * s.head_dim;
}
inline float* Row(float* base, const AttentionShape& s, int64_t ts, int64_t b, int64_t t,
                  int64_t h) {
  return base + (b * s.seq + t) * ts + h * s.head_dim;
}

// packed[d * T + j] = x[b, j, h, d]: one head of K or V, transposed.
void PackTransposed(std::vector<float>& packed, const float* x, const AttentionShape& s, int64_t ts,
                    int64_t b, int64_t h) {
  packed.resize(s.head_dim * s.seq);
  for (int64_t j = 0; j < s.seq; ++j) {
    const float* row = Row(x, s, ts, b, j, h);
    for (int64_t d = 0; d < s.head_dim; ++d) packed[d * s.seq + j] = row[d];
  }
}

// dots[j] = a . packed[:, j] for j in [0, count), summed over d in order (f32).
void DotsWithPacked(float* __restrict dots, const float* __restrict a,
                    const float* __restrict packed, int64_t seq, int64_t head_dim, int64_t count) {
  std::fill(dots, dots + count, 0.0f);
  for (int64_t d = 0; d < head_dim; ++d) {
    const float ad = a[d];
    const float* col = packed + d * seq;
    for (int64_t j = 0; j < count; ++j) dots[j] += ad * col[j];
  }
}

inline bool Visible(const int32_t* seg_row, int64_t i, int64_t j) {
  return seg_row == nullptr || seg_row[j] == seg_row[i];
}

// Keys [0, count) are the candidates for query i: i + 1 when causal, all T otherwise.
inline int64_t KeyCount(const AttentionShape& s, int64_t i) { return s.causal ? i + 1 : s.seq; }

// Natural-log sum of exp(scale * s_j) over keys j < count visible to query i (max subtracted
// first).
float RowLse(const float* scores, int64_t i, int64_t count, const int32_t* seg_row, float scale) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    if (Visible(seg_row, i, j)) max_score = std::max(max_score, scale * scores[j]);
  }
  double sum = 0.0;
  for (int64_t j = 0; j < count; ++j) {
    if (Visible(seg_row, i, j)) sum += std::exp(static_cast<double>(scale * scores[j] - max_score));
  }
  return max_score + static_cast<float>(std::log(sum));  // query i always sees key i: sum >= 1
}

// p[j] = exp(scale * s_j - lse) for visible j < count, 0 for the others.
void FillProbabilities(float* p, const float* scores, int64_t i, int64_t count,
                       const int32_t* seg_row, float scale, float lse) {
  for (int64_t j = 0; j < count; ++j) {
    p[j] = Visible(seg_row, i, j) ? std::exp(scale * scores[j] - lse) : 0.0f;
  }
}

// y += a * x over n contiguous elements.
inline void Axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

}  // namespace

void AttentionForward(const AttentionShape& s, float* out, float* lse, const float* q,
                      const float* k, const float* v, float scale, const int32_t* segment_ids) {
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t D = s.head_dim, T = s.seq;
#pragma omp parallel if (s.batch * s.q_heads * T * T * D > (1 << 16))
  {
    std::vector<float> k_packed, scores(T), p(T);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < s.batch * s.q_heads; ++bh) {
      const int64_t b = bh / s.q_heads, h = bh % s.q_heads, kvh = h / group;
      const int32_t* seg_row = segment_ids == nullptr ? nullptr : segment_ids + b * T;
      PackTransposed(k_packed, k, s, s.k_stride, b, kvh);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t n = KeyCount(s, i);
        DotsWithPacked(scores.data(), Row(q, s, s.q_stride, b, i, h), k_packed.data(), T, D, n);
        const float row_lse = RowLse(scores.data(), i, n, seg_row, scale);
        FillProbabilities(p.data(), scores.data(), i, n, seg_row, scale, row_lse);
        lse[(b * s.q_heads + h) * T + i] = row_lse;
        float* o = Row(out, s, s.o_stride, b, i, h);
        std::fill(o, o + D, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          if (p[j] != 0.0f) Axpy(o, p[j], Row(v, s, s.v_stride, b, j, kvh), D);
        }
      }
    }
  }
}

void AttentionBackward(const AttentionShape& s, float* dq, float* dk, float* dv, const float* dout,
                       const float* q, const float* k, const float* v, const float* out,
                       const float* lse, float scale, const int32_t* segment_ids) {
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t D = s.head_dim, T = s.seq;
  // One task per (b, kv head): it owns dk and dv of that head and dq of its query group, and sums
  // over the group's heads and queries in a fixed order.
#pragma omp parallel if (s.batch * s.q_heads * T * T * D > (1 << 15))
  {
    std::vector<float> k_packed, v_packed, scores(T), p(T), dp(T), ds(T);
    std::vector<float> dk_acc(T * D), dv_acc(T * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bk = 0; bk < s.batch * s.kv_heads; ++bk) {
      const int64_t b = bk / s.kv_heads, kvh = bk % s.kv_heads;
      const int32_t* seg_row = segment_ids == nullptr ? nullptr : segment_ids + b * T;
      PackTransposed(k_packed, k, s, s.k_stride, b, kvh);
      PackTransposed(v_packed, v, s, s.v_stride, b, kvh);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int64_t i = 0; i < T; ++i) {
          const float* qi = Row(q, s, s.q_stride, b, i, h);
          const float* doi = Row(dout, s, s.o_stride, b, i, h);
          const float* oi = Row(out, s, s.o_stride, b, i, h);
          const int64_t n = KeyCount(s, i);
          DotsWithPacked(scores.data(), qi, k_packed.data(), T, D, n);
          FillProbabilities(p.data(), scores.data(), i, n, seg_row, scale,
                            lse[(b * s.q_heads + h) * T + i]);
          DotsWithPacked(dp.data(), doi, v_packed.data(), T, D, n);
          double di = 0.0;  // D_i = dout_i . out_i = sum_j p_ij dp_ij (over every key block)
          for (int64_t d = 0; d < D; ++d) di += static_cast<double>(doi[d]) * oi[d];
          for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - static_cast<float>(di));
          float* dqi = Row(dq, s, s.q_stride, b, i, h);
          std::fill(dqi, dqi + D, 0.0f);
          for (int64_t j = 0; j < n; ++j) {
            if (p[j] == 0.0f) continue;
            const float dsj = scale * ds[j];
            Axpy(dqi, dsj, Row(k, s, s.k_stride, b, j, kvh), D);
            Axpy(dk_acc.data() + j * D, dsj, qi, D);
            Axpy(dv_acc.data() + j * D, p[j], doi, D);
          }
        }
      }
      for (int64_t j = 0; j < T; ++j) {
        std::copy_n(dk_acc.data() + j * D, D, Row(dk, s, s.k_stride, b, j, kvh));
        std::copy_n(dv_acc.data() + j * D, D, Row(dv, s, s.v_stride, b, j, kvh));
      }
    }
  }
}

void AttentionMerge(float* out_acc, float* lse_acc, const float* out_blk, const float* lse_blk,
                    int64_t batch, int64_t seq, int64_t heads, int64_t head_dim) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < seq; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t r = (b * heads + h) * seq + t;
        const float la = lse_acc[r], lb = lse_blk[r];
        float wa = 1.0f, wb = 0.0f, l = la;  // also the case lb == -inf
        if (la == neg_inf) {
          wa = 0.0f;
          wb = lb == neg_inf ? 0.0f : 1.0f;
          l = lb;
        } else if (lb != neg_inf) {
          // l = max + log(1 + exp(-|la - lb|)), computed in f64 and rounded once.
          const double hi = std::max(la, lb), lo = std::min(la, lb);
          const double ld = hi + std::log1p(std::exp(lo - hi));
          wa = static_cast<float>(std::exp(la - ld));
          wb = static_cast<float>(std::exp(lb - ld));
          l = static_cast<float>(ld);
        }
        float* o = out_acc + ((b * seq + t) * heads + h) * head_dim;
        const float* ob = out_blk + ((b * seq + t) * heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = wa * o[d] + wb * ob[d];
        lse_acc[r] = l;
      }
    }
  }
}

}  // namespace tandem::ops::cpu
