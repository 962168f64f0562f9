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

// This thread's share of x (thread `index` of `count`), in the order every caller sums it.
template <typename T, int V>
__device__ __forceinline__ float ThreadSumSquares(const T* x, int64_t n, int64_t index,
                                                  int64_t count) {
  float sum = 0.0f;
  const int64_t num_packs = n / V;
  for (int64_t i = index; i < num_packs; i += count) {
    const Pack<T, V> p = LoadPack<T, V>(x + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float f = ToFloat(p.v[j]);
      sum = __fmaf_rn(f, f, sum);  // one explicit FMA: the same bits in every caller
    }
  }
  for (int64_t i = num_packs * V + index; i < n; i += count) {
    const float f = ToFloat(x[i]);
    sum = __fmaf_rn(f, f, sum);
  }
  return sum;
}

template <typename T, int V>
__global__ void SumSquaresPartialKernel(float* partial, const T* x, int64_t n) {
  __shared__ float shared[32];
  float sum = ThreadSumSquares<T, V>(x, n, GlobalThreadIndex(), GlobalThreadCount());
  sum = BlockSum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void SumSquaresFinalKernel(float* out, const float* partial, int64_t num_partials) {
  __shared__ float shared[32];
  const float v = threadIdx.x < num_partials ? partial[threadIdx.x] : 0.0f;
  const float total = BlockSum(v, shared);
  if (threadIdx.x == 0) out[0] += total;
}

// SumSquaresMulti: a table of tensors, each given NumBlocks(n) consecutive blocks of one grid
// that do exactly what SumSquaresPartialKernel's grid does for it alone.
constexpr int kMultiMax = 100;  // the table stays well inside 4 KB of kernel parameters

struct MultiTable {
  const void* x[kMultiMax];
  int64_t n[kMultiMax];
  int vec[kMultiMax];
  int block_start[kMultiMax + 1];  // tensor i's partials: [block_start[i], block_start[i + 1])
  int count;
};

template <typename T>
__global__ void SumSquaresMultiPartialKernel(float* partial, const __grid_constant__ MultiTable t) {
  __shared__ float shared[32];
  int lo = 0, hi = t.count - 1;  // the tensor whose blocks include this one
  const int b = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const T* x = static_cast<const T*>(t.x[lo]);
  const int64_t index = static_cast<int64_t>(b - t.block_start[lo]) * blockDim.x + threadIdx.x;
  const int64_t count =
      static_cast<int64_t>(t.block_start[lo + 1] - t.block_start[lo]) * blockDim.x;
  float sum = t.vec[lo] ? ThreadSumSquares<T, kVec16<T>>(x, t.n[lo], index, count)
                        : ThreadSumSquares<T, 1>(x, t.n[lo], index, count);
  sum = BlockSum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// Tensor blockIdx.x's partials summed as SumSquaresFinalKernel sums them (one block of
// kFinalThreads per tensor, side by side), into totals.
__global__ void SumSquaresMultiTotalsKernel(float* totals, const float* partial,
                                            const __grid_constant__ MultiTable t) {
  __shared__ float shared[32];
  const int i = static_cast<int>(blockIdx.x);
  const int num_partials = t.block_start[i + 1] - t.block_start[i];
  const float v =
      static_cast<int>(threadIdx.x) < num_partials ? partial[t.block_start[i] + threadIdx.x] : 0.0f;
  const float total = BlockSum(v, shared);
  if (threadIdx.x == 0) totals[i] = total;
}

// out[0] += each total in table order: the additions of one SumSquares call per tensor.
__global__ void SumSquaresMultiAddKernel(float* out, const float* totals, int count) {
  float acc = out[0];
  for (int i = 0; i < count; ++i) acc += totals[i];
  out[0] = acc;
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

size_t SumSquaresMultiScratchBytes(const int64_t* ns, int count) {
  size_t bytes = 0;
  for (int i = 0; i < count; ++i) bytes += SumSquaresScratchBytes(ns[i]);
  return bytes + static_cast<size_t>(kMultiMax) * sizeof(float);  // a table's totals
}

cudaError_t SumSquaresMulti(cudaStream_t stream, DType dtype, float* out, const void* const* xs,
                            const int64_t* ns, int count, void* scratch, size_t scratch_bytes) {
  if (count < 0) return cudaErrorInvalidValue;
  if (scratch_bytes < SumSquaresMultiScratchBytes(ns, count)) return cudaErrorInvalidValue;
  return DispatchFloating(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    float* partial = static_cast<float*>(scratch);
    for (int first = 0; first < count;) {  // tables of up to kMultiMax tensors, in order
      MultiTable t{};
      int blocks = 0;
      int i = first;
      for (; i < count && t.count < kMultiMax; ++i) {
        if (ns[i] <= 0) continue;  // SumSquares adds nothing for an empty tensor
        t.x[t.count] = xs[i];
        t.n[t.count] = ns[i];
        t.vec[t.count] = IsAligned(xs[i], 16) ? 1 : 0;
        t.block_start[t.count] = blocks;
        blocks += static_cast<int>(NumBlocks(ns[i]));
        ++t.count;
      }
      first = i;
      if (t.count == 0) continue;
      t.block_start[t.count] = blocks;
      SumSquaresMultiPartialKernel<T>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial, t);
      float* totals = static_cast<float*>(scratch) + (scratch_bytes / sizeof(float) - kMultiMax);
      SumSquaresMultiTotalsKernel<<<static_cast<unsigned>(t.count), kFinalThreads, 0, stream>>>(
          totals, partial, t);
      SumSquaresMultiAddKernel<<<1, 1, 0, stream>>>(out, totals, t.count);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace tandem::ops::cuda
