// Skinny GEMM for decode: y [M, N] = x [M, K] W^T with W [N, K], bf16 in and out, f32 sums, M <= 64
// (the tokens of a decode step), N and K large (a projection's weights). The time is reading W
// once; cuBLASLt's kernels for M = 32 read it at 0.9-2.5 TB/s (bench/gemm_algos_bench.cc), so
// this kernel streams it with 16-byte loads straight into tensor-core fragments.
//
// mma.m16n8k16 (attention_ptx.cuh) with the mma's A = a 16-row slice of W (16 output features)
// and B = x^T (8 tokens). The sum over k does not care which physical k each fragment slot
// holds as long as A and B agree, so lane (g = lane / 4, t = lane % 4) loads 16 bytes of W's rows
// g and g + 8 and of x's token row g at k = k0 + 8t .. k0 + 8t + 7 and feeds their four bf16
// pairs q0..q3 to two mmas: the first takes (q0, q1) as its (k pair t, k pair t + 4), the second
// (q2, q3). Each warp owns 16 features and every token tile; a block of kWarps warps owns
// 16 * kWarps features and one slice of K.
//
// Split-K: with few feature blocks (N small) the K range is cut into `splits` slices so the grid
// fills the GPU. Each block writes its f32 partial [M, features] to a workspace, and the last
// block of a feature block to finish (an atomic counter per feature block) adds the slices in
// slice order and writes y: deterministic, one kernel. The last block resets its counter to 0,
// so the counters stay zero between launches (and between CUDA graph replays).
#include <type_traits>

#include "ops/cuda/attention_ptx.cuh"
#include "ops/cuda/common.cuh"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kFeatures = 16 * kWarps;  // per block
constexpr int kStep = 32;               // k per loop step (two mmas)

__device__ __forceinline__ uint4 Load16(const bf16* p, bool valid) {
  if (!valid) return make_uint4(0, 0, 0, 0);
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <int kTiles>  // token tiles of 8: M <= 8 * kTiles
__global__ void __launch_bounds__(32 * kWarps)
    SkinnyGemmKernel(bf16* y, int64_t ldy, const bf16* x, int64_t ldx, const bf16* w, int64_t ldw,
                     int M, int64_t N, int64_t K, int64_t kslice, float* partial,
                     unsigned* counters) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFeatures + warp * 16;
  const int64_t kbegin = static_cast<int64_t>(blockIdx.y) * kslice;
  const int64_t kend = min(K, kbegin + kslice);
  const int64_t ra = n0 + g, rb = n0 + g + 8;
  const bf16* wa = w + min(ra, N - 1) * ldw;
  const bf16* wb = w + min(rb, N - 1) * ldw;
  float acc[kTiles][4];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  // kUnroll steps of loads are issued before their mmas, so each warp keeps kUnroll * 32 bytes
  // per lane of W (and x) in flight instead of waiting out a memory latency per step.
  constexpr int kUnroll = kTiles <= 4 ? 4 : 2;
  for (int64_t k0 = kbegin; k0 < kend; k0 += kStep * kUnroll) {
    uint4 qa[kUnroll], qb[kUnroll], qx[kUnroll][kTiles];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kStep + 8 * t;
      const bool kin = k < kend;
      qa[u] = Load16(wa + k, kin && ra < N);
      qb[u] = Load16(wb + k, kin && rb < N);
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        const int m = i * 8 + g;
        qx[u][i] = Load16(x + static_cast<int64_t>(min(m, M - 1)) * ldx + k, kin && m < M);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t a0[4] = {qa[u].x, qb[u].x, qa[u].y, qb[u].y};
      const uint32_t a1[4] = {qa[u].z, qb[u].z, qa[u].w, qb[u].w};
#pragma unroll
      for (int i = 0; i < kTiles; ++i) {
        attn::Mma16816(acc[i], a0, qx[u][i].x, qx[u][i].y);
        attn::Mma16816(acc[i], a1, qx[u][i].z, qx[u][i].w);
      }
    }
  }
  // acc[i]: c0, c1 = (feature n0 + g, tokens 8i + 2t, + 1); c2, c3 = feature n0 + g + 8.
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * kFeatures;
  const int64_t features = min(static_cast<int64_t>(kFeatures), N - f0);
  if (gridDim.y == 1) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = i * 8 + 2 * t + (e & 1);
        const int64_t n = n0 + g + (e >= 2 ? 8 : 0);
        if (m < M && n < N) y[m * ldy + n] = __float2bfloat16_rn(acc[i][e]);
      }
    }
    return;
  }
  // Split-K: this slice's partial, [slice][M][kFeatures] per feature block.
  float* mine =
      partial + (static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y) * M * kFeatures;
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = i * 8 + 2 * t + (e & 1);
      const int64_t f = warp * 16 + g + (e >= 2 ? 8 : 0);
      if (m < M) mine[m * kFeatures + f] = acc[i][e];
    }
  }
  __threadfence();
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* slices = partial + static_cast<int64_t>(blockIdx.x) * gridDim.y * M * kFeatures;
  for (int i = threadIdx.x; i < M * kFeatures; i += blockDim.x) {
    const int m = i / kFeatures, f = i % kFeatures;
    if (f >= features) continue;
    float sum = 0.0f;
    for (unsigned s = 0; s < gridDim.y; ++s) {
      sum += __ldcg(slices + static_cast<int64_t>(s) * M * kFeatures + i);
    }
    y[m * ldy + f0 + f] = __float2bfloat16_rn(sum);
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool SkinnyGemmApplies(int64_t m, int64_t n, int64_t k, const void* x, int64_t ldx, const void* w,
                       int64_t ldw) {
  return m >= 1 && m <= kSkinnyGemmMaxRows && n >= kFeatures && k >= 64 && k % 8 == 0 &&
         ldx % 8 == 0 && ldw % 8 == 0 && Aligned16(x) && Aligned16(w) &&
         n * k >= (int64_t{1} << 20);
}

size_t SkinnyGemmWorkspaceBytes(int64_t m, int64_t n, int64_t k, int sm_count, int* splits) {
  const int64_t blocks = (n + kFeatures - 1) / kFeatures;
  // About four blocks per SM (enough loads in flight to cover memory latency), slices of at
  // least 256 k, at most 16 slices.
  int64_t s = std::clamp<int64_t>((4 * sm_count + blocks - 1) / blocks, 1, 16);
  s = std::min<int64_t>(s, std::max<int64_t>(1, k / 256));
  if (blocks > kSkinnyGemmMaxBlocks) s = 1;  // no counter for it: straight writes only
  *splits = static_cast<int>(s);
  return s > 1 ? static_cast<size_t>(blocks * s * m * kFeatures) * sizeof(float) : 0;
}

cudaError_t SkinnyGemm(cudaStream_t stream, void* y, int64_t ldy, const void* x, int64_t ldx,
                       const void* w, int64_t ldw, int64_t m, int64_t n, int64_t k, int splits,
                       float* partial, unsigned* counters) {
  const int64_t blocks = (n + kFeatures - 1) / kFeatures;
  int64_t kslice = k;
  if (splits > 1) {
    kslice = (k + splits - 1) / splits;
    kslice = (kslice + kStep - 1) / kStep * kStep;
    splits = static_cast<int>((k + kslice - 1) / kslice);
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  auto launch = [&](auto tiles) {
    constexpr int kTiles = decltype(tiles)::value;
    SkinnyGemmKernel<kTiles><<<grid, 32 * kWarps, 0, stream>>>(
        static_cast<bf16*>(y), ldy, static_cast<const bf16*>(x), ldx, static_cast<const bf16*>(w),
        ldw, static_cast<int>(m), n, k, kslice, partial, counters);
    return cudaGetLastError();
  };
  if (m <= 8) return launch(std::integral_constant<int, 1>());
  if (m <= 16) return launch(std::integral_constant<int, 2>());
  if (m <= 32) return launch(std::integral_constant<int, 4>());
  return launch(std::integral_constant<int, 8>());
}

}  // namespace tandem::ops::cuda
