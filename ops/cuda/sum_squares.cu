// Deterministic sum of squares (ops::SumSquares): out[0] += sum x^2 in f32.
//
// Two passes, no atomics: a fixed grid (its size a function of n only) writes one partial sum
// per block to scratch, each block summing a fixed grid-stride slice and reducing in a fixed
// order; then one block adds the partials in index order and adds the total to out[0].
#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;   // = kFinalThreads: the final block reads one each
constexpr int kFinalThreads = 1024;
constexpr int64_t kElemsPerThread = 16;
static_assert(kMaxBlocks <= kFinalThreads, "the final block reads one partial per thread");

int64_t NumBlocks(int64_t n) {
  return std::clamp<int64_t>(CeilDiv(n, kThreads * kElemsPerThread), 1, kMaxBlocks);
}

template <typename T, int V>
__global__ void SumSquaresPartialKernel(float* partial, const T* x, int64_t n) {
  __shared__ float shared[32];
  float sum = 0.0f;
  const int64_t num_packs = n / V;
  for (int64_t i = GlobalThreadIndex(); i < num_packs; i += GlobalThreadCount()) {
    const Pack<T, V> p = LoadPack<T, V>(x + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float f = ToFloat(p.v[j]);
      sum += f * f;
    }
  }
  for (int64_t i = num_packs * V + GlobalThreadIndex(); i < n; i += GlobalThreadCount()) {
    const float f = ToFloat(x[i]);
    sum += f * f;
  }
  sum = BlockSum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void SumSquaresFinalKernel(float* out, const float* partial, int64_t num_partials) {
  __shared__ float shared[32];
  const float v = threadIdx.x < num_partials ? partial[threadIdx.x] : 0.0f;
  const float total = BlockSum(v, shared);
  if (threadIdx.x == 0) out[0] += total;
}

}  // namespace

size_t SumSquaresScratchBytes(int64_t n) {
  return n <= 0 ? 0 : static_cast<size_t>(NumBlocks(n)) * sizeof(float);
}

cudaError_t SumSquares(cudaStream_t stream, DType dtype, float* out, const void* x, int64_t n,
                       void* scratch, size_t scratch_bytes) {
  return DispatchFloating(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (n <= 0) return cudaSuccess;
    if (scratch == nullptr || scratch_bytes < SumSquaresScratchBytes(n)) {
      return cudaErrorInvalidValue;
    }
    const unsigned blocks = static_cast<unsigned>(NumBlocks(n));
    float* partial = static_cast<float*>(scratch);
    const T* xt = static_cast<const T*>(x);
    if (IsAligned(x, 16)) {
      SumSquaresPartialKernel<T, kV><<<blocks, kThreads, 0, stream>>>(partial, xt, n);
    } else {
      SumSquaresPartialKernel<T, 1><<<blocks, kThreads, 0, stream>>>(partial, xt, n);
    }
    SumSquaresFinalKernel<<<1, kFinalThreads, 0, stream>>>(out, partial, blocks);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
