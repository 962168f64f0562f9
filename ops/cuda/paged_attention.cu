// CUDA paged KV cache ops (ops/paged_attention.h).
//
// PagedKvWrite: one block per token, threads over the Hkv * D elements of K and V.
// PagedAttention: one warp per (query token, query head). Lane l owns head elements
// d = l + 32 i (i < D / 32); for each visible position the warp forms q . k with a butterfly
// shuffle reduction (every lane ends with the same sum, in a fixed order) and updates an online
// softmax (running max m, denominator s, weighted V sum) in f32. A plain kernel: fine for decode,
// where each query reads its request's pages once; prefill of long prompts re-reads K/V per query
// token and is slower than the fused training kernel.
#include "ops/cuda/common.cuh"
#include "ops/internal/paged_attention_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // D <= 256

template <typename T>
__global__ void PagedKvWriteKernel(PagedShape s, T* kv, const T* k, const T* v,
                                   const int32_t* slot) {
  const int64_t row = s.kv_heads * s.head_dim;
  for (int64_t n = blockIdx.x; n < s.tokens; n += gridDim.x) {
    const int64_t page = slot[n] / s.block_tokens, t = slot[n] % s.block_tokens;
    T* kp = kv + page * s.page_stride + t * row;
    T* vp = kp + s.block_tokens * row;
    for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
      kp[i] = k[n * s.q_stride + i];
      vp[i] = v[n * s.o_stride + i];
    }
  }
}

template <typename T, int kPerLane>
__global__ void PagedAttentionKernel(PagedShape s, T* out, const T* q, const T* kv,
                                     const int32_t* block_table, const int32_t* req,
                                     const int32_t* pos, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= s.tokens * s.q_heads) return;
  const int64_t n = item / s.q_heads, h = item % s.q_heads;
  const int64_t D = s.head_dim, row = s.kv_heads * D;
  const int64_t kvh = h / (s.q_heads / s.kv_heads);
  const int32_t* table = block_table + static_cast<int64_t>(req[n]) * s.max_blocks;
  const int64_t len = static_cast<int64_t>(pos[n]) + 1;
  float qv[kPerLane], acc[kPerLane];
  for (int i = 0; i < kPerLane; ++i) {
    qv[i] = ToFloat(q[n * s.q_stride + h * D + lane + 32 * i]);
    acc[i] = 0.0f;
  }
  float m = -INFINITY, denom = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const T* kj =
        kv + table[j / s.block_tokens] * s.page_stride + (j % s.block_tokens) * row + kvh * D;
    float dot = 0.0f;
    for (int i = 0; i < kPerLane; ++i) dot += qv[i] * ToFloat(kj[lane + 32 * i]);
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float score = scale * dot;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);  // 0 on the first position (m = -inf)
    const float p = expf(score - m_new);
    denom = denom * correction + p;
    const T* vj = kj + s.block_tokens * row;
    for (int i = 0; i < kPerLane; ++i)
      acc[i] = acc[i] * correction + p * ToFloat(vj[lane + 32 * i]);
    m = m_new;
  }
  const float inv = 1.0f / denom;
  for (int i = 0; i < kPerLane; ++i) {
    out[n * s.o_stride + h * D + lane + 32 * i] = FromFloat<T>(acc[i] * inv);
  }
}

template <typename T, int kPerLane>
cudaError_t LaunchAttention(cudaStream_t stream, const PagedShape& s, void* out, const void* q,
                            const void* kv, const int32_t* block_table, const int32_t* req,
                            const int32_t* pos, float scale) {
  const int64_t items = s.tokens * s.q_heads;
  const unsigned blocks = static_cast<unsigned>((items + kWarps - 1) / kWarps);
  PagedAttentionKernel<T, kPerLane>
      <<<blocks, 32 * kWarps, 0, stream>>>(s, static_cast<T*>(out), static_cast<const T*>(q),
                                           static_cast<const T*>(kv), block_table, req, pos, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t PagedKvWrite(cudaStream_t stream, DType dtype, const PagedShape& s, void* kv,
                         const void* k, const void* v, const int32_t* slot) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (s.tokens <= 0) return cudaSuccess;
    const int threads = static_cast<int>(std::min<int64_t>(256, s.kv_heads * s.head_dim));
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(s.tokens, 65535));
    PagedKvWriteKernel<T><<<blocks, threads, 0, stream>>>(
        s, static_cast<T*>(kv), static_cast<const T*>(k), static_cast<const T*>(v), slot);
    return cudaGetLastError();
  });
}

cudaError_t PagedAttention(cudaStream_t stream, DType dtype, const PagedShape& s, void* out,
                           const void* q, const void* kv, const int32_t* block_table,
                           const int32_t* req, const int32_t* pos, float scale) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (s.tokens <= 0) return cudaSuccess;
    if (s.head_dim % 32 != 0 || s.head_dim > 32 * kMaxPerLane) return cudaErrorInvalidValue;
    switch (s.head_dim / 32) {
      case 1:
        return LaunchAttention<T, 1>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 2:
        return LaunchAttention<T, 2>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 3:
        return LaunchAttention<T, 3>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 4:
        return LaunchAttention<T, 4>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 5:
        return LaunchAttention<T, 5>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 6:
        return LaunchAttention<T, 6>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 7:
        return LaunchAttention<T, 7>(stream, s, out, q, kv, block_table, req, pos, scale);
      case 8:
        return LaunchAttention<T, 8>(stream, s, out, q, kv, block_table, req, pos, scale);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace tandem::ops::cuda
