// Elementwise ops over contiguous buffers (ops::Add, Cast, Fill, Scale).
//
// One grid-stride map kernel moves packs of up to 16 bytes when every buffer is aligned for
// them, with a scalar tail for n % V; math in f32, rounded to nearest even on store. A thread
// reads an element before writing the same index, so outputs may alias inputs.
// Floating dtypes: f32, bf16, f16. Fill also takes i32, i64 and u8: value is truncated toward
// zero and saturated to the type's range (NaN gives 0).
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kThreads = 256;

struct AddOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct ConvertOp {
  __device__ float operator()(float a, float) const { return a; }
};
struct ScaleOp {
  float s;
  __device__ float operator()(float a, float) const { return a * s; }
};

template <int V, bool kBinary, typename TOut, typename TIn, typename Op>
__global__ void MapKernel(TOut* out, const TIn* a, const TIn* b, int64_t n, Op op) {
  const int64_t num_packs = n / V;
  for (int64_t i = GlobalThreadIndex(); i < num_packs; i += GlobalThreadCount()) {
    const Pack<TIn, V> pa = LoadPack<TIn, V>(a + i * V);
    Pack<TIn, V> pb;
    if constexpr (kBinary) pb = LoadPack<TIn, V>(b + i * V);
    Pack<TOut, V> po;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      po.v[j] = FromFloat<TOut>(op(ToFloat(pa.v[j]), kBinary ? ToFloat(pb.v[j]) : 0.0f));
    }
    StorePack<TOut, V>(out + i * V, po);
  }
  for (int64_t i = num_packs * V + GlobalThreadIndex(); i < n; i += GlobalThreadCount()) {
    out[i] = FromFloat<TOut>(op(ToFloat(a[i]), kBinary ? ToFloat(b[i]) : 0.0f));
  }
}

template <bool kBinary, typename TOut, typename TIn, typename Op>
cudaError_t LaunchMap(cudaStream_t stream, TOut* out, const TIn* a, const TIn* b, int64_t n,
                      Op op) {
  constexpr int kV = kVec16<TIn> < kVec16<TOut> ? kVec16<TIn> : kVec16<TOut>;
  const bool vec = IsAligned(out, sizeof(TOut) * kV) && IsAligned(a, sizeof(TIn) * kV) &&
                   (!kBinary || IsAligned(b, sizeof(TIn) * kV));
  if (vec) {
    MapKernel<kV, kBinary><<<GridFor(n / kV + 1, kThreads), kThreads, 0, stream>>>(out, a, b, n,
                                                                                   op);
  } else {
    MapKernel<1, kBinary><<<GridFor(n, kThreads), kThreads, 0, stream>>>(out, a, b, n, op);
  }
  return cudaGetLastError();
}

template <typename T, int V>
__global__ void FillKernel(T* out, int64_t n, T value) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) pack.v[j] = value;
  const int64_t num_packs = n / V;
  for (int64_t i = GlobalThreadIndex(); i < num_packs; i += GlobalThreadCount()) {
    StorePack<T, V>(out + i * V, pack);
  }
  for (int64_t i = num_packs * V + GlobalThreadIndex(); i < n; i += GlobalThreadCount()) {
    out[i] = value;
  }
}

template <typename T>
cudaError_t LaunchFill(cudaStream_t stream, T* out, int64_t n, T value) {
  constexpr int kV = kVec16<T>;
  if (IsAligned(out, 16)) {
    FillKernel<T, kV><<<GridFor(n / kV + 1, kThreads), kThreads, 0, stream>>>(out, n, value);
  } else {
    FillKernel<T, 1><<<GridFor(n, kThreads), kThreads, 0, stream>>>(out, n, value);
  }
  return cudaGetLastError();
}

// Truncates toward zero, saturating to I's range; NaN gives 0.
template <typename I>
I FloatToInt(float value) {
  if (std::isnan(value)) return 0;
  const double v = std::trunc(static_cast<double>(value));
  if (v <= static_cast<double>(std::numeric_limits<I>::min())) {
    return std::numeric_limits<I>::min();
  }
  if (v >= static_cast<double>(std::numeric_limits<I>::max())) {
    return std::numeric_limits<I>::max();
  }
  return static_cast<I>(v);
}

}  // namespace

cudaError_t Add(cudaStream_t stream, DType dtype, void* out, const void* a, const void* b,
                int64_t n) {
  return DispatchFloating(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (n <= 0) return cudaSuccess;
    return LaunchMap<true>(stream, static_cast<T*>(out), static_cast<const T*>(a),
                           static_cast<const T*>(b), n, AddOp{});
  });
}

cudaError_t Cast(cudaStream_t stream, DType out_dtype, void* out, DType in_dtype, const void* in,
                 int64_t n) {
  return DispatchFloating(out_dtype, [&](auto out_tag) -> cudaError_t {
    using TOut = typename decltype(out_tag)::type;
    return DispatchFloating(in_dtype, [&](auto in_tag) -> cudaError_t {
      using TIn = typename decltype(in_tag)::type;
      if (n <= 0) return cudaSuccess;
      if (out_dtype == in_dtype) {
        if (out == in) return cudaSuccess;
        return cudaMemcpyAsync(out, in, static_cast<size_t>(n) * sizeof(TIn),
                               cudaMemcpyDeviceToDevice, stream);
      }
      return LaunchMap<false>(stream, static_cast<TOut*>(out), static_cast<const TIn*>(in),
                              static_cast<const TIn*>(nullptr), n, ConvertOp{});
    });
  });
}

namespace {

struct CopyRowsTable {
  CopyRowsEntry e[kCopyRowsBatch];
};

// blockIdx.y: the entry; blocks along x stride over its units.
template <typename U>
__global__ void CopyRowsBatchKernel(CopyRowsTable table) {
  const CopyRowsEntry& e = table.e[blockIdx.y];
  const int64_t units = e.row_bytes / static_cast<int64_t>(sizeof(U)), total = units * e.rows;
  char* dst = static_cast<char*>(e.dst);
  const char* src = static_cast<const char*>(e.src);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / units, u = i % units;
    *reinterpret_cast<U*>(dst + r * e.dst_pitch + u * static_cast<int64_t>(sizeof(U))) =
        *reinterpret_cast<const U*>(src + r * e.src_pitch + u * static_cast<int64_t>(sizeof(U)));
  }
}

template <typename U>
cudaError_t LaunchCopyRowsBatch(cudaStream_t stream, const CopyRowsTable& table, int count,
                                int64_t most_bytes) {
  const int threads = 256;
  const int64_t units = most_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t blocks = std::clamp<int64_t>((units + threads - 1) / threads, 1, 1024);
  CopyRowsBatchKernel<U>
      <<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count)), threads, 0, stream>>>(
          table);
  return cudaGetLastError();
}

}  // namespace

cudaError_t CopyRowsBytesBatch(cudaStream_t stream, const CopyRowsEntry* entries, int count) {
  if (count <= 0) return cudaSuccess;
  if (count > kCopyRowsBatch) return cudaErrorInvalidValue;
  CopyRowsTable table{};
  uint64_t bits = 0;
  int64_t most = 0;
  for (int i = 0; i < count; ++i) {
    const CopyRowsEntry& e = entries[i];
    table.e[i] = e;
    bits |= reinterpret_cast<uintptr_t>(e.dst) | reinterpret_cast<uintptr_t>(e.src) |
            static_cast<uint64_t>(e.dst_pitch) | static_cast<uint64_t>(e.src_pitch) |
            static_cast<uint64_t>(e.row_bytes);
    most = std::max(most, e.row_bytes * e.rows);
  }
  if (most == 0) return cudaSuccess;
  if (bits % 16 == 0) return LaunchCopyRowsBatch<uint4>(stream, table, count, most);
  if (bits % 8 == 0) return LaunchCopyRowsBatch<uint2>(stream, table, count, most);
  if (bits % 4 == 0) return LaunchCopyRowsBatch<uint32_t>(stream, table, count, most);
  if (bits % 2 == 0) return LaunchCopyRowsBatch<uint16_t>(stream, table, count, most);
  return LaunchCopyRowsBatch<uint8_t>(stream, table, count, most);
}

cudaError_t Fill(cudaStream_t stream, DType dtype, void* out, float value, int64_t n) {
  if (n <= 0) {
    const bool known = IsFloating(dtype) || dtype == DType::kI32 || dtype == DType::kI64 ||
                       dtype == DType::kU8;
    return known ? cudaSuccess : cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kF32: return LaunchFill(stream, static_cast<float*>(out), n, value);
    case DType::kBF16:
      return LaunchFill(stream, static_cast<bf16*>(out), n, FromFloat<bf16>(value));
    case DType::kF16: return LaunchFill(stream, static_cast<f16*>(out), n, FromFloat<f16>(value));
    case DType::kI32:
      return LaunchFill(stream, static_cast<int32_t*>(out), n, FloatToInt<int32_t>(value));
    case DType::kI64:
      return LaunchFill(stream, static_cast<int64_t*>(out), n, FloatToInt<int64_t>(value));
    case DType::kU8:
      return LaunchFill(stream, static_cast<uint8_t*>(out), n, FloatToInt<uint8_t>(value));
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t Scale(cudaStream_t stream, DType dtype, void* x, float s, int64_t n) {
  return DispatchFloating(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (n <= 0) return cudaSuccess;
    T* xt = static_cast<T*>(x);
    return LaunchMap<false>(stream, xt, static_cast<const T*>(xt), static_cast<const T*>(nullptr),
                            n, ScaleOp{s});
  });
}

}  // namespace tandem::ops::cuda
