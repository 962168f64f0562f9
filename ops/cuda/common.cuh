// Shared device helpers for tandem's CUDA kernels (private to ops/cuda): dtype dispatch and
// conversion, aligned vector packs, deterministic warp/block reductions and launch arithmetic.
//
// Determinism: every reduction here combines values in an order fixed by the launch shape
// (butterfly shuffles, then warps in index order); nothing uses atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "core/dtype.h"

namespace tandem::ops::cuda {

using bf16 = __nv_bfloat16;
using f16 = __half;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the storage type of `dtype`; cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t DispatchF32Bf16(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: return f(TypeTag<float>{});
    case DType::kBF16: return f(TypeTag<bf16>{});
    default: return cudaErrorInvalidValue;
  }
}
template <typename F>
cudaError_t DispatchFloating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32: return f(TypeTag<float>{});
    case DType::kBF16: return f(TypeTag<bf16>{});
    case DType::kF16: return f(TypeTag<f16>{});
    default: return cudaErrorInvalidValue;
  }
}

__host__ __device__ __forceinline__ float ToFloat(float x) { return x; }
__host__ __device__ __forceinline__ float ToFloat(bf16 x) { return __bfloat162float(x); }
__host__ __device__ __forceinline__ float ToFloat(f16 x) { return __half2float(x); }

// Round-to-nearest-even conversion from f32 to the storage type.
template <typename T>
__host__ __device__ __forceinline__ T FromFloat(float x);
template <>
__host__ __device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}
template <>
__host__ __device__ __forceinline__ bf16 FromFloat<bf16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__host__ __device__ __forceinline__ f16 FromFloat<f16>(float x) {
  return __float2half_rn(x);
}

// V consecutive elements moved with one aligned access (the pointer must be aligned to the pack).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> LoadPack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void StorePack(T* p, const Pack<T, V>& pack) {
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// Elements of T in one 16-byte access.
template <typename T>
inline constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

inline bool IsAligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when 16-byte packs of T fit every row: cols a multiple of the pack, every pointer 16-byte
// aligned and every row stride a multiple of the pack.
template <typename T>
bool RowsVectorizable(int64_t cols, std::initializer_list<const void*> ptrs,
                      std::initializer_list<int64_t> row_strides) {
  if (cols % kVec16<T> != 0) return false;
  for (const void* p : ptrs) {
    if (!IsAligned(p, 16)) return false;
  }
  for (int64_t s : row_strides) {
    if (s % kVec16<T> != 0) return false;
  }
  return true;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads for a block that spreads `work` items over its threads: a multiple of 32 in
// [32, max_threads] (max_threads a multiple of 32).
inline int ThreadsFor(int64_t work, int max_threads) {
  const int64_t t = CeilDiv(std::max<int64_t>(work, 1), 32) * 32;
  return static_cast<int>(std::min<int64_t>(t, max_threads));
}

// Blocks for a grid-stride loop over `work` items, at most max_blocks.
inline unsigned GridFor(int64_t work, int threads, int64_t max_blocks = 4096) {
  return static_cast<unsigned>(std::clamp<int64_t>(CeilDiv(work, threads), 1, max_blocks));
}

// Blocks for one block per row (grid-stride over rows beyond the limit).
inline unsigned RowGrid(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, int64_t{1} << 30));
}

// Butterfly sum: every lane ends with the same, bitwise-identical total (a + b == b + a).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the same value. blockDim.x must be a multiple of 32.
// `shared` holds >= 32 floats; all threads of the block must call this (it synchronizes).
__device__ __forceinline__ float BlockSum(float v, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpSum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return WarpSum(lane < num_warps ? shared[lane] : 0.0f);
}

// RoPE's rotation of the pair (x1, x2) by the angle of cosine c and sine s, with its roundings
// fixed (one fused multiply-add each) so that every RoPE kernel gives the same bits.
__device__ __forceinline__ void RotatePair(float x1, float x2, float c, float s, float& y1,
                                           float& y2) {
  y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));
  y2 = __fmaf_rn(x2, c, __fmul_rn(x1, s));
}

// Grid-stride index helpers (64-bit: tensors may exceed 2^31 elements).
__device__ __forceinline__ int64_t GlobalThreadIndex() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GlobalThreadCount() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace tandem::ops::cuda
