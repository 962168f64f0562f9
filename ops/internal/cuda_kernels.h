// CUDA launchers behind ops/ops.h. Raw pointers, element strides and a stream; no Tensor, no
// Status: validation happened once above (ops/*.cc). Each launcher enqueues its kernels on
// `stream` and returns cudaGetLastError() (or the first cuBLASLt/CUDA error as a cudaError_t-like
// code through the out-parameter where noted). Only compiled when TANDEM_WITH_CUDA is defined.
//
// dtype: the element type of the "T" pointers (kF32 or kBF16; attention kBF16 only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace tandem::ops::cuda {

struct GemmState;  // cuBLASLt handle, workspace, cached algorithm choices (ops/internal/cuda_resources.h)

// See ops::Matmul. lda/ldb/ldc are row strides (elements) of a, b, c as stored (row-major).
// Returns empty on success, else a message naming the failing cuBLASLt call.
std::string Gemm(GemmState& state, cudaStream_t stream, DType ab_dtype, DType c_dtype, void* c,
                 int64_t ldc, const void* a, int64_t lda, const void* b, int64_t ldb, int64_t m,
                 int64_t n, int64_t k, bool trans_a, bool trans_b, float alpha, float beta);

cudaError_t EmbeddingForward(cudaStream_t stream, DType dtype, void* out, const int32_t* ids,
                             const void* table, int64_t num_tokens, int64_t vocab, int64_t dim);
// dtable f32 += ; scratch must hold EmbeddingBackwardScratchBytes(num_tokens) bytes.
size_t EmbeddingBackwardScratchBytes(int64_t num_tokens);
cudaError_t EmbeddingBackward(cudaStream_t stream, DType dtype, float* dtable, const void* dout,
                              const int32_t* ids, int64_t num_tokens, int64_t vocab, int64_t dim,
                              void* scratch, size_t scratch_bytes);

cudaError_t RmsNormForward(cudaStream_t stream, DType dtype, void* y, int64_t y_stride,
                           float* rstd /*nullable*/, const void* x, int64_t x_stride, const void* w,
                           int64_t rows, int64_t cols, float eps);
cudaError_t AddRmsNormForward(cudaStream_t stream, DType dtype, void* sum, int64_t sum_stride,
                              void* y, int64_t y_stride, const void* a, int64_t a_stride,
                              const void* b, int64_t b_stride, const void* w, int64_t rows,
                              int64_t cols, float eps);
// dw (nullable) f32 += ; scratch must hold RmsNormBackwardScratchBytes(rows, cols) bytes.
size_t RmsNormBackwardScratchBytes(int64_t rows, int64_t cols);
cudaError_t RmsNormBackward(cudaStream_t stream, DType dtype, void* dx, int64_t dx_stride,
                            float* dw, const void* dy, int64_t dy_stride, const void* x,
                            int64_t x_stride, const void* w, const float* rstd, int64_t rows,
                            int64_t cols, bool accumulate_dx, void* scratch, size_t scratch_bytes);

// x, y: [tokens, heads, head_dim], token strides in elements; y may equal x.
cudaError_t Rope(cudaStream_t stream, DType dtype, void* y, int64_t y_token_stride, const void* x,
                 int64_t x_token_stride, const int32_t* positions, const float* inv_freq,
                 int64_t tokens, int64_t heads, int64_t head_dim, bool inverse);

struct AttentionShape {
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  // Token strides (elements) of each [B, T, H, D] operand; batch stride = seq * token stride.
  int64_t q_stride, k_stride, v_stride, o_stride;
  bool causal = true;  // false: every key visible (ops::AttentionMask::kFull)
  // Use the wgmma kernels on devices of compute capability 9.0 (ops::AttentionKernel::kAuto);
  // false: the mma.sync kernels everywhere.
  bool allow_sm90 = true;
  // With the wgmma kernels: dQ inside the dK/dV kernel (needs the larger scratch that
  // AttentionBackwardScratchBytes then asks for); false: dQ in its own kernel.
  bool fused_dq = true;
};
// bf16 only. lse f32 [B, Hq, T]. segment_ids nullable [B, T].
size_t AttentionBackwardScratchBytes(const AttentionShape& s);
cudaError_t AttentionForward(cudaStream_t stream, const AttentionShape& s, void* out, float* lse,
                             const void* q, const void* k, const void* v, float scale,
                             const int32_t* segment_ids);
// dq/dk/dv token strides: dq uses q_stride, dk k_stride, dv v_stride (views into a fused dqkv
// shaped like the fused qkv). scratch: AttentionBackwardScratchBytes(s) bytes (delta, and with
// fused dQ its f32 partial sums and ordering counters).
cudaError_t AttentionBackward(cudaStream_t stream, const AttentionShape& s, void* dq, void* dk,
                              void* dv, const void* dout, const void* q, const void* k,
                              const void* v, const void* out, const float* lse, float scale,
                              const int32_t* segment_ids, void* scratch, size_t scratch_bytes);
// See ops::AttentionMerge: out_acc f32 [B, T, H, D], out_blk blk_dtype (f32 or bf16) [B, T, H, D],
// lse_acc, lse_blk f32 [B, H, T], contiguous.
cudaError_t AttentionMerge(cudaStream_t stream, DType blk_dtype, float* out_acc, float* lse_acc,
                           const void* out_blk, const float* lse_blk, int64_t batch, int64_t seq,
                           int64_t heads, int64_t head_dim);

cudaError_t SwigluForward(cudaStream_t stream, DType dtype, void* out, int64_t out_stride,
                          const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                          int64_t rows, int64_t cols);
cudaError_t SwigluBackward(cudaStream_t stream, DType dtype, void* dgate, int64_t dgate_stride,
                           void* dup, int64_t dup_stride, const void* dout, int64_t dout_stride,
                           const void* gate, int64_t gate_stride, const void* up, int64_t up_stride,
                           int64_t rows, int64_t cols);

// dlogits nullable; may equal logits.
cudaError_t CrossEntropy(cudaStream_t stream, DType dtype, float* losses, void* dlogits,
                         const void* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                         float grad_scale);
// See ops::ShardedCrossEntropyPartials / Finish; dlogits nullable, may equal logits.
cudaError_t ShardedCrossEntropyPartials(cudaStream_t stream, DType dtype, float* partials,
                                        const void* logits, const int32_t* targets, int64_t rows,
                                        int64_t cols, int64_t vocab_start, int64_t valid);
cudaError_t ShardedCrossEntropyFinish(cudaStream_t stream, DType dtype, float* losses,
                                      void* dlogits, const void* logits,
                                      const float* all_partials, int64_t ranks,
                                      const int32_t* targets, int64_t rows, int64_t cols,
                                      int64_t vocab_start, int64_t valid, float grad_scale);

cudaError_t AdamW(cudaStream_t stream, float* master, float* m, float* v, void* model_weights,
                  DType model_dtype, const float* grad, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int64_t step, float grad_scale);

// One tensor of AdamWMulti (ops/multi_tensor.h); model_weights null or of AdamWMulti's
// model_dtype.
struct AdamWMultiArgs {
  float* master;
  float* m;
  float* v;
  void* model_weights;
  const float* grad;
  int64_t n;
  float weight_decay;
};
cudaError_t AdamWMulti(cudaStream_t stream, const AdamWMultiArgs* entries, int count,
                       DType model_dtype, float lr, float beta1, float beta2, float eps,
                       int64_t step, float grad_scale);

// One tensor of AdamWBf16Multi (ops/multi_tensor.h): param of the call's param_dtype (f32 or
// bf16), m and v bf16 bits.
struct AdamWBf16Args {
  void* param;
  uint16_t* m;
  uint16_t* v;
  const float* grad;
  int64_t n;
  float weight_decay;
  uint64_t noise_key;
};
cudaError_t AdamWBf16Multi(cudaStream_t stream, const AdamWBf16Args* entries, int count,
                           DType param_dtype, float lr, float beta1, float beta2, float eps,
                           int64_t step, float grad_scale);

// out[0] += sum x^2; scratch must hold SumSquaresScratchBytes(n) bytes.
size_t SumSquaresScratchBytes(int64_t n);
cudaError_t SumSquares(cudaStream_t stream, DType dtype, float* out, const void* x, int64_t n,
                       void* scratch, size_t scratch_bytes);

// out[0] += sum over xs[i] (count tensors, in order, all of `dtype`) of SumSquares(xs[i]), the
// same bits; scratch must hold SumSquaresMultiScratchBytes(ns, count) bytes.
size_t SumSquaresMultiScratchBytes(const int64_t* ns, int count);
cudaError_t SumSquaresMulti(cudaStream_t stream, DType dtype, float* out, const void* const* xs,
                            const int64_t* ns, int count, void* scratch, size_t scratch_bytes);

cudaError_t Add(cudaStream_t stream, DType dtype, void* out, const void* a, const void* b, int64_t n);
cudaError_t Cast(cudaStream_t stream, DType out_dtype, void* out, DType in_dtype, const void* in,
                 int64_t n);
cudaError_t Fill(cudaStream_t stream, DType dtype, void* out, float value, int64_t n);
// Up to kCopyRowsBatch row copies in one launch: entry i copies `rows` rows of row_bytes bytes
// from src (row pitch src_pitch bytes) to dst (pitch dst_pitch), one thread per 16, 8, 4, 2 or 1
// bytes (the widest every pointer, pitch and row_bytes of the batch allow). For narrow rows, which
// cudaMemcpy2DAsync moves a few bytes at a time.
struct CopyRowsEntry {
  void* dst;
  const void* src;
  int64_t dst_pitch, src_pitch, row_bytes, rows;
};
inline constexpr int kCopyRowsBatch = 8;
cudaError_t CopyRowsBytesBatch(cudaStream_t stream, const CopyRowsEntry* entries, int count);
cudaError_t Scale(cudaStream_t stream, DType dtype, void* x, float s, int64_t n);

}  // namespace tandem::ops::cuda

namespace tandem::ops::cuda {
// Creates the cuBLASLt handle and a workspace on the current device; nullptr + message on failure.
GemmState* CreateGemmState(std::string* error);
void DestroyGemmState(GemmState* state);
}  // namespace tandem::ops::cuda
