// ops::LoraDropoutAt (ops/lora.h) on CUDA: one thread per element (grid-stride), the mask of row
// row_ids[n] (or n) and column col_offset + c.
#include "ops/cuda/common.cuh"
#include "ops/internal/lora_kernels.h"

namespace tandem::ops::cuda {
namespace {

template <typename T>
__global__ void LoraDropoutAtKernel(T* y, int64_t ldy, const T* x, int64_t ldx, int64_t rows,
                                    int64_t cols, const int64_t* row_ids, int64_t col_offset,
                                    uint64_t seed, float p, bool accumulate) {
  const int64_t total = rows * cols;
  for (int64_t i = GlobalThreadIndex(); i < total; i += GlobalThreadCount()) {
    const int64_t n = i / cols, c = i % cols;
    const int64_t row = row_ids != nullptr ? row_ids[n] : n;
    const float v = ToFloat(x[n * ldx + c]) * lora::DropoutScale(seed, row, col_offset + c, p);
    T* dst = y + n * ldy + c;
    *dst = FromFloat<T>(accumulate ? ToFloat(*dst) + v : v);
  }
}

}  // namespace

cudaError_t LoraDropoutAt(cudaStream_t stream, DType dtype, void* y, int64_t ldy, const void* x,
                          int64_t ldx, int64_t rows, int64_t cols, const int64_t* row_ids,
                          int64_t col_offset, uint64_t seed, float p, bool accumulate) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const int threads = 256;
    LoraDropoutAtKernel<T><<<GridFor(rows * cols, threads), threads, 0, stream>>>(
        static_cast<T*>(y), ldy, static_cast<const T*>(x), ldx, rows, cols, row_ids, col_offset,
        seed, p, accumulate);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
