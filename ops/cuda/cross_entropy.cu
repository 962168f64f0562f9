// Fused row-wise cross-entropy with its logits gradient (ops::CrossEntropy).
//
// One block per row, vocabularies up to (at least) 256K. Pass 1 keeps an online (max, sum-exp)
// pair per thread, combined over the block in a fixed order and broadcast from thread 0, so
// every thread of a row uses the same lse:
//   lse = max + log(sum exp(x - max)),  loss = lse - x[target]
// Pass 2 writes dlogits = grad_scale * (exp(x - lse) - onehot(target)). Every read of pass 1
// (and of x[target]) precedes the block barrier inside the reduction, and pass 2 reads each
// element before writing it in the same thread, so dlogits may be logits (in place).
// target == -100 (kIgnoreIndex): loss 0 and a zero row. A target outside [0, V) that is not
// -100 gives a NaN loss (visible, never an out-of-bounds read) and a gradient with no one-hot.
//
// The vocabulary-sharded variant (tensor parallelism) splits the same two passes around an
// all-gather: pass 1 writes each row's (max, sum-exp, owned target logit), pass 2 combines the
// ranks' partials in rank order and writes the loss and the gradient of the local columns.
#include <cmath>

#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int32_t kIgnoreTarget = -100;  // ops::kIgnoreIndex

struct MaxSum {
  float max;
  float sum;  // of exp(x - max)
};

__device__ __forceinline__ MaxSum Combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, a.sum + b.sum};  // both empty (keeps a NaN sum visible)
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum WarpCombine(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const MaxSum other{__shfl_xor_sync(0xffffffffu, v.max, offset),
                       __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v = Combine(v, other);
  }
  return v;
}

// Block-wide combine; thread 0's result is broadcast to all. `shared` holds >= 66 floats.
__device__ MaxSum BlockCombine(MaxSum v, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = WarpCombine(v);
  __syncthreads();  // the previous call's broadcast has been read
  if (lane == 0) {
    shared[warp] = v.max;
    shared[32 + warp] = v.sum;
  }
  __syncthreads();
  if (warp == 0) {
    MaxSum w{-INFINITY, 0.0f};
    if (lane < num_warps) w = MaxSum{shared[lane], shared[32 + lane]};
    w = WarpCombine(w);
    if (lane == 0) {
      shared[64] = w.max;
      shared[65] = w.sum;
    }
  }
  __syncthreads();
  return {shared[64], shared[65]};
}

__device__ __forceinline__ void OnlineAdd(MaxSum& acc, float x) {
  if (x > acc.max) {
    acc.sum = acc.sum * expf(acc.max - x) + 1.0f;  // max -inf: 0 * 0 + 1
    acc.max = x;
  } else if (x != -INFINITY) {  // -inf adds 0; NaN poisons the sum
    acc.sum += expf(x - acc.max);
  }
}

template <typename T, int V>
__global__ void CrossEntropyKernel(float* losses, T* dlogits, const T* logits,
                                   const int32_t* targets, int64_t rows, int64_t vocab,
                                   float grad_scale) {
  __shared__ float shared[66];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * vocab;
    T* dr = dlogits != nullptr ? dlogits + r * vocab : nullptr;
    const int32_t target = targets[r];
    if (target == kIgnoreTarget) {
      if (threadIdx.x == 0) losses[r] = 0.0f;
      if (dr != nullptr) {
        Pack<T, V> zero;
#pragma unroll
        for (int i = 0; i < V; ++i) zero.v[i] = FromFloat<T>(0.0f);
        for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < vocab; c += blockDim.x * V) {
          StorePack<T, V>(dr + c, zero);
        }
      }
      continue;
    }
    float target_logit = NAN;
    if (threadIdx.x == 0 && target >= 0 && target < vocab) target_logit = ToFloat(lr[target]);
    MaxSum acc{-INFINITY, 0.0f};
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < vocab; c += blockDim.x * V) {
      const Pack<T, V> p = LoadPack<T, V>(lr + c);
#pragma unroll
      for (int i = 0; i < V; ++i) OnlineAdd(acc, ToFloat(p.v[i]));
    }
    const MaxSum total = BlockCombine(acc, shared);
    const float lse = total.max + logf(total.sum);
    if (threadIdx.x == 0) losses[r] = lse - target_logit;
    if (dr == nullptr) continue;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < vocab; c += blockDim.x * V) {
      const Pack<T, V> p = LoadPack<T, V>(lr + c);
      Pack<T, V> d;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float prob = expf(ToFloat(p.v[i]) - lse);
        const float onehot = (c + i == target) ? 1.0f : 0.0f;
        d.v[i] = FromFloat<T>(grad_scale * (prob - onehot));
      }
      StorePack<T, V>(dr + c, d);
    }
  }
}

// Vocabulary-sharded cross-entropy, pass 1: (max, sum of exp(x - max), owned target logit) of
// the row's first `valid` columns. One block per row.
template <typename T, int V>
__global__ void ShardedPartialsKernel(float* partials, const T* logits, const int32_t* targets,
                                      int64_t rows, int64_t cols, int64_t vocab_start,
                                      int64_t valid) {
  __shared__ float shared[66];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * cols;
    MaxSum acc{-INFINITY, 0.0f};
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < valid; c += blockDim.x * V) {
      const Pack<T, V> p = LoadPack<T, V>(lr + c);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (c + i < valid) OnlineAdd(acc, ToFloat(p.v[i]));
      }
    }
    const MaxSum total = BlockCombine(acc, shared);
    if (threadIdx.x == 0) {
      const int32_t target = targets[r];
      const int64_t t = static_cast<int64_t>(target) - vocab_start;
      const bool mine = target != kIgnoreTarget && t >= 0 && t < valid;
      partials[r * 3 + 0] = total.max;
      partials[r * 3 + 1] = total.sum;
      partials[r * 3 + 2] = mine ? ToFloat(lr[t]) : 0.0f;
    }
  }
}

// Pass 2: every thread combines the R partials of its row in rank order (same bits on every
// rank), thread 0 writes the loss, and the row's gradient is written (padding columns 0).
template <typename T, int V>
__global__ void ShardedFinishKernel(float* losses, T* dlogits, const T* logits,
                                    const float* all_partials, int64_t ranks,
                                    const int32_t* targets, int64_t rows, int64_t cols,
                                    int64_t vocab_start, int64_t valid, float grad_scale) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * cols;
    T* dr = dlogits != nullptr ? dlogits + r * cols : nullptr;
    const int32_t target = targets[r];
    const bool ignored = target == kIgnoreTarget;
    float lse = 0.0f;
    if (!ignored) {
      float max_all = -INFINITY;
      for (int64_t k = 0; k < ranks; ++k) max_all = fmaxf(max_all, all_partials[(k * rows + r) * 3]);
      float sum = 0.0f, target_logit = 0.0f;
      for (int64_t k = 0; k < ranks; ++k) {
        const float* p = all_partials + (k * rows + r) * 3;
        if (p[0] != -INFINITY) sum += p[1] * expf(p[0] - max_all);
        target_logit += p[2];
      }
      lse = max_all + logf(sum);
      if (threadIdx.x == 0) losses[r] = lse - target_logit;
    } else if (threadIdx.x == 0) {
      losses[r] = 0.0f;
    }
    if (dr == nullptr) continue;
    const int64_t t = static_cast<int64_t>(target) - vocab_start;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * V; c < cols; c += blockDim.x * V) {
      const Pack<T, V> p = LoadPack<T, V>(lr + c);
      Pack<T, V> d;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float g = 0.0f;
        if (!ignored && c + i < valid) {
          const float prob = expf(ToFloat(p.v[i]) - lse);
          g = grad_scale * (c + i == t ? prob - 1.0f : prob);
        }
        d.v[i] = FromFloat<T>(g);
      }
      StorePack<T, V>(dr + c, d);
    }
  }
}

}  // namespace

cudaError_t CrossEntropy(cudaStream_t stream, DType dtype, float* losses, void* dlogits,
                         const void* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                         float grad_scale) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0) return cudaSuccess;
    if (vocab <= 0) return cudaErrorInvalidValue;
    T* d = static_cast<T*>(dlogits);
    const T* x = static_cast<const T*>(logits);
    const bool vec = vocab % kV == 0 && IsAligned(logits, 16) &&
                     (dlogits == nullptr || IsAligned(dlogits, 16));
    if (vec) {
      CrossEntropyKernel<T, kV><<<RowGrid(rows), ThreadsFor(vocab / kV, 512), 0, stream>>>(
          losses, d, x, targets, rows, vocab, grad_scale);
    } else {
      CrossEntropyKernel<T, 1><<<RowGrid(rows), ThreadsFor(vocab, 512), 0, stream>>>(
          losses, d, x, targets, rows, vocab, grad_scale);
    }
    return cudaGetLastError();
  });
}

cudaError_t ShardedCrossEntropyPartials(cudaStream_t stream, DType dtype, float* partials,
                                        const void* logits, const int32_t* targets, int64_t rows,
                                        int64_t cols, int64_t vocab_start, int64_t valid) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0) return cudaSuccess;
    if (cols <= 0 || valid < 0 || valid > cols) return cudaErrorInvalidValue;
    const T* x = static_cast<const T*>(logits);
    if (cols % kV == 0 && IsAligned(logits, 16)) {
      ShardedPartialsKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 512), 0, stream>>>(
          partials, x, targets, rows, cols, vocab_start, valid);
    } else {
      ShardedPartialsKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 512), 0, stream>>>(
          partials, x, targets, rows, cols, vocab_start, valid);
    }
    return cudaGetLastError();
  });
}

cudaError_t ShardedCrossEntropyFinish(cudaStream_t stream, DType dtype, float* losses,
                                      void* dlogits, const void* logits,
                                      const float* all_partials, int64_t ranks,
                                      const int32_t* targets, int64_t rows, int64_t cols,
                                      int64_t vocab_start, int64_t valid, float grad_scale) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int kV = kVec16<T>;
    if (rows <= 0) return cudaSuccess;
    if (cols <= 0 || valid < 0 || valid > cols || ranks <= 0) return cudaErrorInvalidValue;
    T* d = static_cast<T*>(dlogits);
    const T* x = static_cast<const T*>(logits);
    const bool vec = cols % kV == 0 && IsAligned(logits, 16) &&
                     (dlogits == nullptr || IsAligned(dlogits, 16));
    if (vec) {
      ShardedFinishKernel<T, kV><<<RowGrid(rows), ThreadsFor(cols / kV, 512), 0, stream>>>(
          losses, d, x, all_partials, ranks, targets, rows, cols, vocab_start, valid, grad_scale);
    } else {
      ShardedFinishKernel<T, 1><<<RowGrid(rows), ThreadsFor(cols, 512), 0, stream>>>(
          losses, d, x, all_partials, ranks, targets, rows, cols, vocab_start, valid, grad_scale);
    }
    return cudaGetLastError();
  });
}

}  // namespace tandem::ops::cuda
