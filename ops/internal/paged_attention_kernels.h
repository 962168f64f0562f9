// Kernels behind ops/paged_attention.h: raw pointers, element strides, no Tensor or Status (the
// public ops validate once). Private to ops/.
#pragma once

#include <cstdint>

#include "core/dtype.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::ops {

// Sizes and strides (elements) shared by the CPU and CUDA kernels.
struct PagedShape {
  int64_t tokens;        // N query tokens
  int64_t q_heads;       // Hq
  int64_t kv_heads;      // Hkv
  int64_t head_dim;      // D
  int64_t block_tokens;  // positions per page
  int64_t page_stride;   // elements between pages of kv
  int64_t max_blocks;    // columns of block_table
  int64_t q_stride;      // token stride of q (or k in PagedKvWrite)
  int64_t o_stride;      // token stride of out (or v in PagedKvWrite)
};

namespace cpu {
void PagedKvWrite(const PagedShape& s, float* kv, const float* k, const float* v,
                  const int32_t* slot);
void PagedAttention(const PagedShape& s, float* out, const float* q, const float* kv,
                    const int32_t* block_table, const int32_t* req, const int32_t* pos,
                    float scale);
}  // namespace cpu

#ifdef TANDEM_WITH_CUDA
namespace cuda {
cudaError_t PagedKvWrite(cudaStream_t stream, DType dtype, const PagedShape& s, void* kv,
                         const void* k, const void* v, const int32_t* slot);
// s.q_heads: the rotated-only (q) heads before the kv_heads k heads of qk; s.q_stride: qk's token
// stride; s.o_stride: v's.
cudaError_t RopePagedKvWrite(cudaStream_t stream, DType dtype, const PagedShape& s, void* kv,
                             void* qk, const void* v, const int32_t* positions,
                             const float* inv_freq, const int32_t* slot);
cudaError_t PagedAttention(cudaStream_t stream, DType dtype, const PagedShape& s, void* out,
                           const void* q, const void* kv, const int32_t* block_table,
                           const int32_t* req, const int32_t* pos, float scale);
}  // namespace cuda
#endif

}  // namespace tandem::ops
