// CUDA paged KV cache ops (ops/paged_attention.h).
//
// PagedKvWrite: one block per token, threads over the Hkv * D elements of K and V.
//
// PagedAttention, grouped kernel (GQA group size G in {1, 2, 4, 8}, 16-byte aligned K/V rows of
// at most 32 16-byte vectors): one block of W warps per (query token, kv head), so each K/V
// row of the request is read once for the G query heads that share it. A position's row is
// D / kVec 16-byte vectors (kVec = 8 bf16 or 4 f32); P = D / kVec lanes read one position, so a
// warp takes 32 / P positions per step and the block W * 32 / P. Each lane scores its
// vector against the G queries (kept in shared memory, f32), the P lanes of a position sum the
// partial dots with a butterfly shuffle, and every lane keeps G online softmaxes (running max,
// denominator, its kVec elements of the weighted V sum) over the positions it saw, in base 2 (the
// queries are scaled by log2(e) once). At the end the 32 / P states of a warp merge through
// shuffles and the W warp states through shared memory, each in a fixed order.
// W is 16 when the batch has few (token, kv head) pairs (decode: the grid alone would leave most
// of the GPU idle and every block would walk its positions in many dependent steps), else 4.
// Deterministic: the position-to-lane map and every reduction order depend only on the shapes.
//
// Other shapes use the plain kernel: one warp per (query token, query head), lane l owns head
// elements d = l + 32 i; the same online softmax over all positions.
//
// Both are decode kernels: a prefill chunk re-reads the request's K/V once per query token.
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

// ops::RopePagedKvWrite: block per token; as RopeKernel (ops/cuda/rope.cu), thread x owns
// frequency i and thread y walks the q and k heads, rotating each pair in place with the same
// arithmetic (sincosf, RotatePair), and a k head's rotated pair also goes to the page;
// then the block copies the token's V row. Bitwise what Rope followed by PagedKvWrite write.
template <typename T>
__global__ void RopePagedKvWriteKernel(PagedShape s, T* kv, T* qk, const T* v,
                                       const int32_t* positions, const float* inv_freq,
                                       const int32_t* slot) {
  const int64_t half = s.head_dim / 2, heads = s.q_heads + s.kv_heads;
  const int64_t row = s.kv_heads * s.head_dim, k_offset = s.q_heads * s.head_dim;
  const int threads = static_cast<int>(blockDim.x * blockDim.y);
  const int flat = static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
  for (int64_t n = blockIdx.x; n < s.tokens; n += gridDim.x) {
    const float pos = static_cast<float>(positions[n]);
    const int64_t page = slot[n] / s.block_tokens, t = slot[n] % s.block_tokens;
    T* kp = kv + page * s.page_stride + t * row;
    T* vp = kp + s.block_tokens * row;
    T* xn = qk + n * s.q_stride;
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
      const float angle = pos * inv_freq[i];
      float sin_a, cos_a;
      sincosf(angle, &sin_a, &cos_a);
      for (int64_t h = threadIdx.y; h < heads; h += blockDim.y) {
        const int64_t lo = h * 2 * half + i;
        float r1, r2;
        RotatePair(ToFloat(xn[lo]), ToFloat(xn[lo + half]), cos_a, sin_a, r1, r2);
        const T y1 = FromFloat<T>(r1);
        const T y2 = FromFloat<T>(r2);
        xn[lo] = y1;
        xn[lo + half] = y2;
        if (h >= s.q_heads) {
          kp[lo - k_offset] = y1;
          kp[lo - k_offset + half] = y2;
        }
      }
    }
    const T* vn = v + n * s.o_stride;
    for (int64_t i = flat; i < row; i += threads) vp[i] = vn[i];
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

// 16 bytes of T as floats.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ __forceinline__ static void Load(const float* p, float (&out)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};
template <>
struct Vec<bf16> {
  static constexpr int kN = 8;
  __device__ __forceinline__ static void Load(const bf16* p, float (&out)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

// Shared memory of the grouped kernel: queries [G][D], then per warp (one partial state each)
// and head: max [W][G], denominator [W][G], merge weight [W][G], V sum [W][G][D]; all f32.
template <typename T, int G, int P, int W>
struct GroupedShape {
  static constexpr int kVec = Vec<T>::kN;
  static constexpr int kD = P * kVec;
  static constexpr int kPerWarp = 32 / P;     // positions a warp reads per step
  static constexpr int kStep = W * kPerWarp;  // positions a block reads per step
  static constexpr size_t kSmemBytes =
      sizeof(float) * (G * kD + 3 * W * G + static_cast<size_t>(W) * G * kD);
};

// Folds the online-softmax state (m, l, acc) of the lane `offset` away into this lane's (both
// hold the same heads and vector). Scores are in log2 units; m = -inf is an empty state.
template <int G, int kVec>
__device__ __forceinline__ void MergeLanes(float (&m)[G], float (&l)[G], float (&acc)[G][kVec],
                                           int offset) {
  for (int g = 0; g < G; ++g) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m[g], offset);
    const float l_o = __shfl_xor_sync(0xffffffffu, l[g], offset);
    const float m_new = fmaxf(m[g], m_o);
    const float c_self = m[g] == -INFINITY ? 0.0f : exp2f(m[g] - m_new);
    const float c_o = m_o == -INFINITY ? 0.0f : exp2f(m_o - m_new);
    l[g] = l[g] * c_self + l_o * c_o;
    for (int e = 0; e < kVec; ++e) {
      const float a_o = __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
      acc[g][e] = acc[g][e] * c_self + a_o * c_o;
    }
    m[g] = m_new;
  }
}

// Block per (token, kv head), W warps. Each step a warp reads kPerWarp positions (P lanes a
// position, one 16-byte vector a lane) and every lane keeps the online softmax of its positions
// for the G query heads; at the end the kPerWarp states of a warp meet through shuffles, the W
// warp states through shared memory (weights once per (warp, head)), in a fixed order.
template <typename T, int G, int P, int W>
__global__ void __launch_bounds__(32 * W)
    PagedAttentionGroupedKernel(PagedShape s, T* out, const T* q, const T* kv,
                                const int32_t* block_table, const int32_t* req, const int32_t* pos,
                                float scale) {
  using Geo = GroupedShape<T, G, P, W>;
  constexpr int kVec = Geo::kVec, kD = Geo::kD, kStep = Geo::kStep;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ float smem[];
  float* q_s = smem;           // [G][D], pre-scaled by scale * log2(e)
  float* m_s = q_s + G * kD;   // [W][G]
  float* l_s = m_s + W * G;    // [W][G]
  float* w_s = l_s + W * G;    // [W][G]
  float* acc_s = w_s + W * G;  // [W][G][D]
  const int64_t n = blockIdx.x / s.kv_heads, kvh = blockIdx.x % s.kv_heads;
  const int64_t row = s.kv_heads * kD;
  for (int i = threadIdx.x; i < G * kD; i += blockDim.x) {
    const int g = i / kD, d = i % kD;
    q_s[i] = scale * kLog2e * ToFloat(q[n * s.q_stride + (kvh * G + g) * kD + d]);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / P, part = lane % P;  // position within the warp's step, vector index
  const int32_t* table = block_table + static_cast<int64_t>(req[n]) * s.max_blocks;
  const int64_t len = static_cast<int64_t>(pos[n]) + 1;
  float m[G], l[G], acc[G][kVec];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < len; j0 += kStep) {
    const int64_t j = j0 + warp * Geo::kPerWarp + slot;
    const bool valid = j < len;
    float k[kVec], v[kVec];
    if (valid) {
      const T* kj = kv + table[j / s.block_tokens] * s.page_stride + (j % s.block_tokens) * row +
                    kvh * kD + part * kVec;
      Vec<T>::Load(kj, k);
      Vec<T>::Load(kj + s.block_tokens * row, v);
    } else {
      for (int e = 0; e < kVec; ++e) k[e] = v[e] = 0.0f;
    }
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
      for (int e = 0; e < kVec; ++e) dot += q_s[g * kD + part * kVec + e] * k[e];
      for (int off = P / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (!valid) continue;
      const float m_new = fmaxf(m[g], dot);
      const float correction = exp2f(m[g] - m_new);  // 0 on the lane's first position
      const float p = exp2f(dot - m_new);
      l[g] = l[g] * correction + p;
      for (int e = 0; e < kVec; ++e) acc[g][e] = acc[g][e] * correction + p * v[e];
      m[g] = m_new;
    }
  }
  // The warp's positions: slots meet pairwise (lane bits P, 2P, .. 16).
  for (int offset = P; offset < 32; offset *= 2) MergeLanes<G, kVec>(m, l, acc, offset);
  if (slot == 0) {
    for (int g = 0; g < G; ++g) {
      if (part == 0) {
        m_s[warp * G + g] = m[g];
        l_s[warp * G + g] = l[g];
      }
      for (int e = 0; e < kVec; ++e) acc_s[(warp * G + g) * kD + part * kVec + e] = acc[g][e];
    }
  }
  __syncthreads();
  // Each warp state's weight for head g: 2^(m - max over warps), 0 for an empty state.
  for (int i = threadIdx.x; i < W * G; i += blockDim.x) {
    const int g = i % G;
    float m_all = -INFINITY;
    for (int t = 0; t < W; ++t) m_all = fmaxf(m_all, m_s[t * G + g]);
    w_s[i] = m_s[i] == -INFINITY ? 0.0f : exp2f(m_s[i] - m_all);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * kD; i += blockDim.x) {
    const int g = i / kD, d = i % kD;
    float denom = 0.0f, sum = 0.0f;
    for (int t = 0; t < W; ++t) {
      const float w = w_s[t * G + g];
      denom += w * l_s[t * G + g];
      sum += w * acc_s[(t * G + g) * kD + d];
    }
    out[n * s.o_stride + (kvh * G + g) * kD + d] = FromFloat<T>(sum / denom);
  }
}

// (token, kv head) pairs below which a block gets 16 warps (decode batches).
constexpr int64_t kWideBlockPairs = 1024;

template <typename T, int G, int P, int W>
cudaError_t LaunchGroupedW(cudaStream_t stream, const PagedShape& s, void* out, const void* q,
                           const void* kv, const int32_t* block_table, const int32_t* req,
                           const int32_t* pos, float scale) {
  using Geo = GroupedShape<T, G, P, W>;
  const int64_t blocks = s.tokens * s.kv_heads;
  if (Geo::kSmemBytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(PagedAttentionGroupedKernel<T, G, P, W>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(Geo::kSmemBytes));
    if (err != cudaSuccess) return err;
  }
  PagedAttentionGroupedKernel<T, G, P, W>
      <<<static_cast<unsigned>(blocks), 32 * W, Geo::kSmemBytes, stream>>>(
          s, static_cast<T*>(out), static_cast<const T*>(q), static_cast<const T*>(kv), block_table,
          req, pos, scale);
  return cudaGetLastError();
}

template <typename T, int G, int P>
cudaError_t LaunchGrouped(cudaStream_t stream, const PagedShape& s, void* out, const void* q,
                          const void* kv, const int32_t* block_table, const int32_t* req,
                          const int32_t* pos, float scale) {
  if (s.tokens * s.kv_heads < kWideBlockPairs) {
    return LaunchGroupedW<T, G, P, 16>(stream, s, out, q, kv, block_table, req, pos, scale);
  }
  return LaunchGroupedW<T, G, P, kWarps>(stream, s, out, q, kv, block_table, req, pos, scale);
}

// The grouped kernel for (G, P), or nullptr when the shape has none.
using AttentionLauncher = cudaError_t (*)(cudaStream_t, const PagedShape&, void*, const void*,
                                          const void*, const int32_t*, const int32_t*,
                                          const int32_t*, float);
template <typename T, int G>
AttentionLauncher GroupedForP(int64_t p) {
  switch (p) {
    case 4:
      return LaunchGrouped<T, G, 4>;
    case 8:
      return LaunchGrouped<T, G, 8>;
    case 16:
      return LaunchGrouped<T, G, 16>;
    case 32:
      return LaunchGrouped<T, G, 32>;
    default:
      return nullptr;
  }
}

template <typename T>
AttentionLauncher GroupedLauncher(const PagedShape& s, const void* kv) {
  constexpr int kVec = Vec<T>::kN;
  if (s.head_dim % kVec != 0 || s.tokens * s.kv_heads > INT32_MAX) return nullptr;
  // 16-byte loads: the pool's base and page stride must keep every row aligned.
  if (reinterpret_cast<uintptr_t>(kv) % 16 != 0 || (s.page_stride * sizeof(T)) % 16 != 0) {
    return nullptr;
  }
  const int64_t p = s.head_dim / kVec;
  switch (s.q_heads / s.kv_heads) {
    case 1:
      return GroupedForP<T, 1>(p);
    case 2:
      return GroupedForP<T, 2>(p);
    case 4:
      return GroupedForP<T, 4>(p);
    case 8:
      return GroupedForP<T, 8>(p);
    default:
      return nullptr;
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

cudaError_t RopePagedKvWrite(cudaStream_t stream, DType dtype, const PagedShape& s, void* kv,
                             void* qk, const void* v, const int32_t* positions,
                             const float* inv_freq, const int32_t* slot) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (s.head_dim % 2 != 0) return cudaErrorInvalidValue;
    if (s.tokens <= 0) return cudaSuccess;
    // RopeKernel's block shape (ops/cuda/rope.cu).
    const int64_t half = s.head_dim / 2, heads = s.q_heads + s.kv_heads;
    const int bx = ThreadsFor(half, 128);
    const int by = static_cast<int>(std::clamp<int64_t>(256 / bx, 1, heads));
    RopePagedKvWriteKernel<T><<<RowGrid(s.tokens), dim3(bx, by), 0, stream>>>(
        s, static_cast<T*>(kv), static_cast<T*>(qk), static_cast<const T*>(v), positions, inv_freq,
        slot);
    return cudaGetLastError();
  });
}

cudaError_t PagedAttention(cudaStream_t stream, DType dtype, const PagedShape& s, void* out,
                           const void* q, const void* kv, const int32_t* block_table,
                           const int32_t* req, const int32_t* pos, float scale) {
  return DispatchF32Bf16(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (s.tokens <= 0) return cudaSuccess;
    if (AttentionLauncher grouped = GroupedLauncher<T>(s, kv)) {
      return grouped(stream, s, out, q, kv, block_table, req, pos, scale);
    }
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
