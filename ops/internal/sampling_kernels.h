// Kernels behind ops/sampling.h: raw pointers and strides, no Tensor or Status (ops/sampling.cc
// validates once). Private to ops/.
#pragma once

#include <cstdint>

#include "core/dtype.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem::ops {

namespace cpu {
// ids[r] = argmax of logits[r * row_stride + 0 .. valid) (lowest index on ties), or `invalid` for
// a row with a NaN or +inf, or only -inf.
void ArgmaxRows(int32_t* ids, const float* logits, int64_t rows, int64_t row_stride, int64_t valid,
                int32_t invalid);
}  // namespace cpu

#ifdef TANDEM_WITH_CUDA
namespace cuda {
cudaError_t ArgmaxRows(cudaStream_t stream, DType dtype, int32_t* ids, const void* logits,
                       int64_t rows, int64_t row_stride, int64_t valid, int32_t invalid);
}  // namespace cuda
#endif

}  // namespace tandem::ops
