// CUDA ops::ArgmaxRows (ops/sampling.h): one block per row. Each thread scans a strided slice
// keeping (value, index) with the lowest index on ties and a "bad value seen" flag; a warp
// shuffle reduction and one over the block's warps pick the row's winner. The result does not
// depend on the thread count (max with lowest-index tie-break is associative and commutative).
#include "ops/cuda/common.cuh"
#include "ops/internal/sampling_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kThreads = 256;

struct Best {
  float value;
  int32_t index;
  int bad;
};

__device__ __forceinline__ Best Better(Best a, Best b) {
  Best out = (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  out.bad = a.bad | b.bad;
  return out;
}

template <typename T>
__global__ void ArgmaxRowsKernel(int32_t* ids, const T* logits, int64_t row_stride, int64_t valid,
                                 int32_t invalid) {
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * row_stride;
  Best best{-INFINITY, INT32_MAX, 0};
  for (int64_t i = threadIdx.x; i < valid; i += kThreads) {
    const float x = ToFloat(row[i]);
    if (isnan(x) || x == INFINITY) best.bad = 1;
    if (x > best.value || best.index == INT32_MAX) {  // the first element seen takes the slot
      best.value = x;
      best.index = static_cast<int32_t>(i);
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    Best other;
    other.value = __shfl_xor_sync(0xffffffffu, best.value, off);
    other.index = __shfl_xor_sync(0xffffffffu, best.index, off);
    other.bad = __shfl_xor_sync(0xffffffffu, best.bad, off);
    best = Better(best, other);
  }
  __shared__ Best warp_best[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    Best b = warp_best[0];
    for (int w = 1; w < kThreads / 32; ++w) b = Better(b, warp_best[w]);
    const bool all_neg_inf = b.value == -INFINITY;
    ids[blockIdx.x] = (b.bad || all_neg_inf || b.index == INT32_MAX) ? invalid : b.index;
  }
}

}  // namespace

cudaError_t ArgmaxRows(cudaStream_t stream, DType dtype, int32_t* ids, const void* logits,
                       int64_t rows, int64_t row_stride, int64_t valid, int32_t invalid) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (rows <= 0) return cudaSuccess;
    if (rows > INT32_MAX || valid > INT32_MAX) return cudaErrorInvalidValue;
    ArgmaxRowsKernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        ids, static_cast<const T*>(logits), row_stride, valid, invalid);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
