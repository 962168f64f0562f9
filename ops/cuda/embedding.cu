// Embedding lookup and its deterministic backward (ops::EmbeddingForward/EmbeddingBackward).
//
// Forward: one block per token copies table[id] (16-byte packs when aligned); an id outside
// [0, vocab) gives a zero row.
// Backward without float atomics: (id, position) pairs are radix-sorted (stable, so equal ids
// keep increasing positions), then the block that starts each run of equal ids sums the run's
// dout rows in increasing position order, in f32, and adds the sum to dtable[id]. Out-of-range ids
// sort to a sentinel key (= vocab) and are skipped. A run is split over columns only, so each
// dtable element is written by exactly one thread: bitwise reproducible.
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kBackwardColsPerBlock = 256;  // one column per thread

template <typename T, int V>
__global__ void EmbeddingForwardKernel(T* out, const int32_t* ids, const T* table,
                                       int64_t num_tokens, int64_t vocab, int64_t dim) {
  for (int64_t n = blockIdx.x; n < num_tokens; n += gridDim.x) {
    const int64_t id = ids[n];
    T* dst = out + n * dim;
    if (id >= 0 && id < vocab) {
      const T* src = table + id * dim;
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < dim; c += blockDim.x * V) {
        StorePack<T, V>(dst + c, LoadPack<T, V>(src + c));
      }
    } else {
      Pack<T, V> zero;
#pragma unroll
      for (int i = 0; i < V; ++i) zero.v[i] = FromFloat<T>(0.0f);
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < dim; c += blockDim.x * V) {
        StorePack<T, V>(dst + c, zero);
      }
    }
  }
}

// keys[n] = ids[n] (or the sentinel `vocab` when out of range), positions[n] = n.
__global__ void EmbeddingSortInputKernel(uint32_t* keys, int32_t* positions, const int32_t* ids,
                                         int64_t num_tokens, int64_t vocab) {
  for (int64_t n = GlobalThreadIndex(); n < num_tokens; n += GlobalThreadCount()) {
    const int32_t id = ids[n];
    keys[n] = (id >= 0 && id < vocab) ? static_cast<uint32_t>(id) : static_cast<uint32_t>(vocab);
    positions[n] = static_cast<int32_t>(n);
  }
}

// Block (i, j): if sorted entry i starts a run of equal keys, sums that run's dout rows over
// columns [j * blockDim.x, ...) in sorted (= increasing position) order and adds to dtable. The
// block first finds where the run ends (blockDim.x keys at a time), so the sum's loads can be
// issued eight rows at a time (long runs: byte-level vocabularies repeat a few ids thousands of
// times in a batch); the additions keep their order.
template <typename T>
__global__ void EmbeddingBackwardRunKernel(float* dtable, const T* dout, const uint32_t* keys,
                                           const int32_t* positions, int64_t num_tokens,
                                           int64_t vocab, int64_t dim) {
  const int64_t i = blockIdx.x;
  const uint32_t key = keys[i];
  if (key >= vocab || (i > 0 && keys[i - 1] == key)) return;
  __shared__ int run_end;  // num_tokens <= INT32_MAX (checked by the launcher)
  if (threadIdx.x == 0) run_end = static_cast<int>(num_tokens);
  __syncthreads();
  for (int64_t base = i + 1; base < num_tokens; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    if (j < num_tokens && keys[j] != key) atomicMin(&run_end, static_cast<int>(j));
    __syncthreads();
    const bool found = run_end < num_tokens;
    __syncthreads();  // every thread has read run_end before the next round lowers it
    if (found) break;
  }
  const int64_t end = run_end;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  constexpr int kUnroll = 8;
  float sum = 0.0f;
  int64_t j = i;
  for (; j + kUnroll <= end; j += kUnroll) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = ToFloat(dout[static_cast<int64_t>(positions[j + u]) * dim + c]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sum += v[u];
  }
  for (; j < end; ++j) sum += ToFloat(dout[static_cast<int64_t>(positions[j]) * dim + c]);
  dtable[static_cast<int64_t>(key) * dim + c] += sum;
}

constexpr size_t kScratchAlign = 256;
size_t AlignUp(size_t bytes) { return (bytes + kScratchAlign - 1) / kScratchAlign * kScratchAlign; }

// CUB temp bytes for sorting num_tokens pairs on keys bits [0, end_bit); 0 and *err on failure.
size_t SortTempBytes(int64_t num_tokens, int end_bit, cudaError_t* err) {
  size_t bytes = 0;
  cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> values(nullptr, nullptr);
  *err = cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, values,
                                         static_cast<int>(num_tokens), 0, end_bit);
  return *err == cudaSuccess ? bytes : 0;
}

template <typename T>
cudaError_t LaunchForward(cudaStream_t stream, T* out, const int32_t* ids, const T* table,
                          int64_t num_tokens, int64_t vocab, int64_t dim) {
  constexpr int kV = kVec16<T>;
  const bool vec = dim % kV == 0 && IsAligned(out, 16) && IsAligned(table, 16);
  const int threads = ThreadsFor(vec ? dim / kV : dim, 256);
  if (vec) {
    EmbeddingForwardKernel<T, kV><<<RowGrid(num_tokens), threads, 0, stream>>>(
        out, ids, table, num_tokens, vocab, dim);
  } else {
    EmbeddingForwardKernel<T, 1><<<RowGrid(num_tokens), threads, 0, stream>>>(
        out, ids, table, num_tokens, vocab, dim);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t EmbeddingForward(cudaStream_t stream, DType dtype, void* out, const int32_t* ids,
                             const void* table, int64_t num_tokens, int64_t vocab, int64_t dim) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (num_tokens <= 0 || dim <= 0) return cudaSuccess;
    return LaunchForward<T>(stream, static_cast<T*>(out), ids, static_cast<const T*>(table),
                            num_tokens, vocab, dim);
  });
}

// Layout: keys[2][N] u32, positions[2][N] i32 (CUB double buffers), then CUB's temp storage
// sized for a full 32-bit key sort (the most any vocabulary needs).
size_t EmbeddingBackwardScratchBytes(int64_t num_tokens) {
  if (num_tokens <= 0) return 0;
  cudaError_t err = cudaSuccess;
  const size_t temp = SortTempBytes(num_tokens, 32, &err);
  return 4 * AlignUp(static_cast<size_t>(num_tokens) * 4) + AlignUp(temp);
}

cudaError_t EmbeddingBackward(cudaStream_t stream, DType dtype, float* dtable, const void* dout,
                              const int32_t* ids, int64_t num_tokens, int64_t vocab, int64_t dim,
                              void* scratch, size_t scratch_bytes) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (num_tokens <= 0 || dim <= 0 || vocab <= 0) return cudaSuccess;
    if (num_tokens > INT32_MAX || vocab >= INT32_MAX || dim > int64_t{65535} * 256) {
      return cudaErrorInvalidValue;
    }
    const size_t array_bytes = AlignUp(static_cast<size_t>(num_tokens) * 4);
    if (scratch == nullptr || scratch_bytes < 4 * array_bytes) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(scratch);
    uint32_t* keys0 = reinterpret_cast<uint32_t*>(base);
    uint32_t* keys1 = reinterpret_cast<uint32_t*>(base + array_bytes);
    int32_t* pos0 = reinterpret_cast<int32_t*>(base + 2 * array_bytes);
    int32_t* pos1 = reinterpret_cast<int32_t*>(base + 3 * array_bytes);
    void* temp = base + 4 * array_bytes;
    const size_t temp_avail = scratch_bytes - 4 * array_bytes;

    // Keys hold ids and the sentinel `vocab`: sort only the bits they use when the temp storage
    // for that fits (it does not grow with fewer bits in practice), else all 32.
    int end_bit = 1;
    while (end_bit < 32 && (uint64_t{1} << end_bit) <= static_cast<uint64_t>(vocab)) ++end_bit;
    cudaError_t err = cudaSuccess;
    size_t temp_bytes = SortTempBytes(num_tokens, end_bit, &err);
    if (err != cudaSuccess) return err;
    if (temp_bytes > temp_avail) {
      end_bit = 32;
      temp_bytes = SortTempBytes(num_tokens, end_bit, &err);
      if (err != cudaSuccess) return err;
      if (temp_bytes > temp_avail) return cudaErrorInvalidValue;
    }

    EmbeddingSortInputKernel<<<GridFor(num_tokens, 256), 256, 0, stream>>>(keys0, pos0, ids,
                                                                           num_tokens, vocab);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    cub::DoubleBuffer<uint32_t> keys(keys0, keys1);
    cub::DoubleBuffer<int32_t> positions(pos0, pos1);
    err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys, positions,
                                          static_cast<int>(num_tokens), 0, end_bit, stream);
    if (err != cudaSuccess) return err;

    const dim3 grid(static_cast<unsigned>(num_tokens),
                    static_cast<unsigned>(CeilDiv(dim, kBackwardColsPerBlock)));
    EmbeddingBackwardRunKernel<T><<<grid, kBackwardColsPerBlock, 0, stream>>>(
        dtable, static_cast<const T*>(dout), keys.Current(), positions.Current(), num_tokens,
        vocab, dim);
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
