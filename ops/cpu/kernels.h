// The CPU reference kernels behind ops/ops.h: f32 over raw pointers and element strides.
//
// They know nothing of Tensor, Context or Status: the public ops validated every argument once
// above (ops/*.cc), so preconditions here are programmer errors. Each kernel writes exactly what
// the matching op in ops/ops.h documents (overwrite vs accumulate, in-place rules).
//
// Accuracy: GEMM is OpenBLAS sgemm. Row reductions (RMSNorm mean of squares, softmax sums,
// cross-entropy, weight-gradient sums over tokens, sum of squares, attention's D_i = dout.out) are
// accumulated in f64 and rounded once; elementwise math and attention's dot products and weighted
// sums are f32, summed in a fixed order.
// Determinism: OpenMP splits only independent rows, heads or columns, and every sum runs in a fixed
// order, so results are bitwise identical for any OMP_NUM_THREADS.
// Thread-safety: kernels are reentrant; concurrent calls must not write the same memory.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace tandem::ops::cpu {

// c = alpha * op(a) @ op(b) + beta * c (row-major, leading dimensions in elements). beta == 0
// ignores c's old contents, NaNs included.
void Gemm(float* c, int64_t ldc, const float* a, int64_t lda, const float* b, int64_t ldb,
          int64_t m, int64_t n, int64_t k, bool trans_a, bool trans_b, float alpha, float beta);

// out [tokens, dim] = table[ids[t]]; ids already checked to lie in [0, vocab).
void EmbeddingForward(float* out, const int32_t* ids, const float* table, int64_t tokens,
                      int64_t dim);
// dtable[v] += (sum in increasing t of dout[t] with ids[t] == v), the sum in f32.
void EmbeddingBackward(float* dtable, const float* dout, const int32_t* ids, int64_t tokens,
                       int64_t vocab, int64_t dim);

// rstd nullable.
void RmsNormForward(float* y, int64_t y_stride, float* rstd, const float* x, int64_t x_stride,
                    const float* w, int64_t rows, int64_t cols, float eps);
// dw nullable (f32 +=); dx = or += when accumulate_dx.
void RmsNormBackward(float* dx, int64_t dx_stride, float* dw, const float* dy, int64_t dy_stride,
                     const float* x, int64_t x_stride, const float* w, const float* rstd,
                     int64_t rows, int64_t cols, bool accumulate_dx);

// x, y [tokens, heads, head_dim] with token strides; y may equal x.
void Rope(float* y, int64_t y_token_stride, const float* x, int64_t x_token_stride,
          const int32_t* positions, const float* inv_freq, int64_t tokens, int64_t heads,
          int64_t head_dim, bool inverse);

struct AttentionShape {
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  // Token strides (elements) of each [B, T, H, D] operand; batch stride = seq * token stride.
  int64_t q_stride, k_stride, v_stride, o_stride;
  bool causal = true;  // false: every key visible (ops::AttentionMask::kFull)
};
// lse f32 [B, Hq, T]; segment_ids nullable [B, T].
void AttentionForward(const AttentionShape& s, float* out, float* lse, const float* q,
                      const float* k, const float* v, float scale, const int32_t* segment_ids);
// dq uses q_stride, dk k_stride, dv v_stride, dout o_stride; all overwritten.
void AttentionBackward(const AttentionShape& s, float* dq, float* dk, float* dv, const float* dout,
                       const float* q, const float* k, const float* v, const float* out,
                       const float* lse, float scale, const int32_t* segment_ids);
// See ops::AttentionMerge; out_acc, out_blk [B, T, H, D], lse_acc, lse_blk [B, H, T], contiguous.
void AttentionMerge(float* out_acc, float* lse_acc, const float* out_blk, const float* lse_blk,
                    int64_t batch, int64_t seq, int64_t heads, int64_t head_dim);

void SwigluForward(float* out, int64_t out_stride, const float* gate, int64_t gate_stride,
                   const float* up, int64_t up_stride, int64_t rows, int64_t cols);
void SwigluBackward(float* dgate, int64_t dgate_stride, float* dup, int64_t dup_stride,
                    const float* dout, int64_t dout_stride, const float* gate, int64_t gate_stride,
                    const float* up, int64_t up_stride, int64_t rows, int64_t cols);

// dlogits nullable, may equal logits; targets already checked (in [0, vocab) or ignore_index).
void CrossEntropy(float* losses, float* dlogits, const float* logits, const int32_t* targets,
                  int64_t rows, int64_t vocab, float grad_scale, int32_t ignore_index);
// See ops::ShardedCrossEntropyPartials / Finish; dlogits nullable, may equal logits.
void ShardedCrossEntropyPartials(float* partials, const float* logits, const int32_t* targets,
                                 int64_t rows, int64_t cols, int64_t vocab_start, int64_t valid,
                                 int32_t ignore_index);
void ShardedCrossEntropyFinish(float* losses, float* dlogits, const float* logits,
                               const float* all_partials, int64_t ranks, const int32_t* targets,
                               int64_t rows, int64_t cols, int64_t vocab_start, int64_t valid,
                               float grad_scale, int32_t ignore_index);

// model_weights nullable, f32 or bf16 (model_dtype).
void AdamW(float* master, float* m, float* v, void* model_weights, DType model_dtype,
           const float* grad, int64_t n, float lr, float beta1, float beta2, float eps,
           float weight_decay, int64_t step, float grad_scale);

// AdamW with bf16 moments (ops::AdamWBf16Multi, one tensor): param f32 or bf16 (param_dtype)
// updated in place, bf16 results rounded stochastically with the noise of `noise_key`.
void AdamWBf16State(void* param, DType param_dtype, Bf16* m, Bf16* v, const float* grad, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, int64_t step,
                    float grad_scale, uint64_t noise_key);

// out[0] += sum of x^2 (x f32, bf16 or f16 per dtype), summed in f64 in fixed-size blocks.
void SumSquares(float* out, DType dtype, const void* x, int64_t n);

// Elementwise over f32, bf16 or f16 (math in f32, rounded to nearest even on store). An element
// is read before the same index is written, so out may alias an input.
void Add(DType dtype, void* out, const void* a, const void* b, int64_t n);
void Cast(DType out_dtype, void* out, DType in_dtype, const void* in, int64_t n);
void Scale(DType dtype, void* x, float s, int64_t n);
// Any dtype; integers get value truncated toward zero and saturated to their range (NaN gives 0).
void Fill(DType dtype, void* out, float value, int64_t n);

}  // namespace tandem::ops::cpu
