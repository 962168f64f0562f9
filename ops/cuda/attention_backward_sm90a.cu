// Fused causal grouped-query attention, backward, on Hopper's warpgroup tensor cores (wgmma),
// bf16, D in {64, 128}: the dK/dV and dQ kernels of attention_backward_dkdv.cuh and
// attention_backward_dq.cuh with their products on wgmma (the delta kernel and the scheme are
// unchanged: deterministic, one writer per output element, fixed summation order). Compiled for
// sm_90a only (CMakeLists.txt: tandem_ops_sm90a); attention_backward.cu calls it on devices of
// compute capability 9.0.
//
// Each warpgroup owns 64 rows (keys for dK/dV, queries for dQ). Operands sit in the swizzled
// panelled tiles of wgmma.cuh, read K-major where the product reduces over D (S^T = K Q^T,
// dP^T = V dO^T, S = Q K^T, dP = dO V^T) and transposed where it reduces over the rows of the
// streamed tile (dV += P^T dO, dK += dS^T Q, dQ += dS K, with P and dS from registers).
// The streamed tile (queries for dK/dV, keys for dQ) holds one or more sub-tiles of 64 rows,
// done one after the other between two barriers.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_common.cuh"
#include "ops/cuda/attention_sm90a.h"
#include "ops/cuda/wgmma.cuh"

namespace tandem::ops::cuda::attn {
namespace sm90 {
namespace {

// Rounds a 64 x kN accumulator (P^T, dS^T, dS) to the bf16 A fragments of kN / 16 k-steps.
template <int kN>
__device__ __forceinline__ void PackAll(uint32_t (&a)[kN / 16][4], const float (&c)[kN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) PackA(a[kk], c[2 * kk], c[2 * kk + 1]);
}

// P^T for the dK/dV kernel, keys as rows: p = 2^(s * scale_log2 - lse2[query]) as one FFMA and
// one exp2 per score, with ProbsTransposed's masking rule (attention_backward_dkdv.cuh) applied
// only where need_mask says a tile can hold an invisible pair.
template <int kBM>
__device__ __forceinline__ void ProbsTransposedFused(float (&s)[kBM / 8][4], float scale_log2,
                                                     bool need_mask, bool causal, int key_row0,
                                                     int q0, int seq, const float* lse2,
                                                     const int32_t* qseg, const int (&kseg)[2],
                                                     int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);  // query inside the tile
      float prob = Exp2(fmaf(s[nt][e], scale_log2, -lse2[col]));
      if (need_mask) {
        const int key = key_row0 + g + 8 * (e >> 1);
        const int query = q0 + col;
        bool visible = (causal ? key <= query : key < seq) && query < seq;
        if (qseg != nullptr) visible = visible && qseg[col] == kseg[e >> 1];
        if (!visible) prob = 0.f;
      }
      s[nt][e] = prob;
    }
}

// P for the dQ kernel, queries as rows: p = 2^(s * scale_log2 - lse2[row]) (one FFMA and one
// exp2), 0 where ScaleAndMaskRows' rule (attention_common.cuh) says the key is invisible,
// checked only where need_mask says a tile can hold one.
template <int kBN>
__device__ __forceinline__ void ProbsFused(float (&s)[kBN / 8][4], float scale_log2, bool need_mask,
                                           bool causal, int q_row0, int k0, int seq,
                                           const int32_t* kseg, const int (&qseg)[2],
                                           const float (&lse2)[2], int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float prob = Exp2(fmaf(s[nt][e], scale_log2, -lse2[e >> 1]));
      if (need_mask) {
        const int row = q_row0 + g + 8 * (e >> 1);
        const int col = nt * 8 + 2 * t + (e & 1);
        const int key = k0 + col;
        bool visible = (!causal || key <= row) && key < seq;
        if (kseg != nullptr) visible = visible && kseg[col] == qseg[e >> 1];
        if (!visible) prob = 0.f;
      }
      s[nt][e] = prob;
    }
}

// ------------------------------------------------------------------------------------------
// dK, dV: one block per (batch, kv head, tile of kBN = 64 * kGroups keys); the block walks the
// query tiles (kBM rows) of every query head of the group that can see the tile, in order.
// ------------------------------------------------------------------------------------------
template <int kD, int kGroups, int kBM>
struct DkdvTraits {
  static constexpr int kThreads = kGroups * 128;
  static constexpr int kBN = kGroups * 64;
  static constexpr uint32_t kKVBytes = kBN * kD * 2;  // K or V tile
  static constexpr uint32_t kQBytes = kBM * kD * 2;   // one Q or dO buffer
  static constexpr uint32_t kStatsOffset = 2 * kKVBytes + 4 * kQBytes;
  // K | V | Q[2] | dO[2] | lse2[2][kBM] | delta[2][kBM] | query segment ids [2][kBM], + align
  static constexpr size_t kSmemBytes = kStatsOffset + 2 * kBM * 12 + 1024;
};

// grid: x = b * Hkv + kv head, y = key tiles (tile 0, which sees the most queries, starts first).
template <int kD, int kGroups, int kBM, int kMinBlocks>
__global__ void __launch_bounds__(kGroups * 128, kMinBlocks) DkdvKernel(const BwdParams p) {
  using Tr = DkdvTraits<kD, kGroups, kBM>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char* smem = smem_raw + pad;
  const uint32_t sk = raw_addr + pad;
  const uint32_t sv = sk + Tr::kKVBytes;
  const uint32_t sq = sv + Tr::kKVBytes;                             // [2]
  const uint32_t sdo = sq + 2 * Tr::kQBytes;                         // [2]
  float* slse2 = reinterpret_cast<float*>(smem + Tr::kStatsOffset);  // [2][kBM]
  float* sdelta = slse2 + 2 * kBM;                                   // [2][kBM]
  int32_t* sseg = reinterpret_cast<int32_t*>(sdelta + 2 * kBM);      // [2][kBM]

  const int seq = p.seq;
  const int b = blockIdx.x / p.kv_heads;
  const int kvh = blockIdx.x % p.kv_heads;
  const int k0 = blockIdx.y * Tr::kBN;
  const int tid = threadIdx.x;
  const int group = tid >> 7;
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_k0 = k0 + group * 64 + warp * 16;  // the warp's first key

  const int64_t b_tokens = static_cast<int64_t>(b) * seq;
  const bf16* k = p.k + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + b_tokens;

  // Iteration it visits query head kvh * group + it / nq, query tile qt_first + it % nq.
  const int qt_first = p.causal ? k0 / kBM : 0;  // causal: queries before k0 see no key here
  const int nq = CeilDiv(seq, kBM) - qt_first;
  const int iters = p.group * nq;

  auto load_q = [&](int it, int buf) {
    const int h = kvh * p.group + it / nq;
    const int qs = (qt_first + it % nq) * kBM;
    const bf16* q = p.q + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD;
    const bf16* dout = p.dout + b_tokens * p.o_stride + static_cast<int64_t>(h) * kD;
    LoadTileSwizzled<kBM, kD, Tr::kThreads>(sq + buf * Tr::kQBytes, q, p.q_stride, qs, seq, tid);
    LoadTileSwizzled<kBM, kD, Tr::kThreads>(sdo + buf * Tr::kQBytes, dout, p.o_stride, qs, seq,
                                            tid);
    CpAsyncCommit();
    const int64_t stats = (b_tokens * p.q_heads) + static_cast<int64_t>(h) * seq;  // [b, h, 0]
    StoreQueryStats(slse2 + buf * kBM, sdelta + buf * kBM, sseg + buf * kBM, p, stats, seg, qs, kBM,
                    seq, tid, Tr::kThreads);
  };
  LoadTileSwizzled<Tr::kBN, kD, Tr::kThreads>(sk, k, p.k_stride, k0, seq, tid);
  LoadTileSwizzled<Tr::kBN, kD, Tr::kThreads>(sv, v, p.v_stride, k0, seq, tid);
  load_q(0, 0);  // the first group holds K, V and the first Q, dO tiles

  int kseg[2] = {};
  if (seg != nullptr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int key = warp_k0 + g + 8 * hf;
      kseg[hf] = key < seq ? seg[key] : -1;
    }
  }

  float dk[kD / 8][4];
  float dv[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  const uint32_t k_rows = sk + static_cast<uint32_t>(group * 64 * 128);  // this group's keys
  const uint32_t v_rows = sv + static_cast<uint32_t>(group * 64 * 128);
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();  // iteration it's tiles are visible; everyone is done with buffer buf ^ 1
    if (it + 1 < iters) load_q(it + 1, buf ^ 1);
    const int q0 = (qt_first + it % nq) * kBM;
    const uint32_t q_tile = sq + buf * Tr::kQBytes;
    const uint32_t do_tile = sdo + buf * Tr::kQBytes;
    const float* lse2 = slse2 + buf * kBM;
    const float* delta = sdelta + buf * kBM;

    // The streamed tile in sub-tiles of 64 queries (the accumulators' width), one barrier and
    // one round of loads for all of them.
#pragma unroll 1
    for (int sub = 0; sub < kBM / 64; ++sub) {
      const int qs0 = q0 + sub * 64;
      if (p.causal && qs0 + 63 < k0) continue;  // these queries see no key of the tile
      const uint32_t q_sub = q_tile + static_cast<uint32_t>(sub * 64 * 128);
      const uint32_t do_sub = do_tile + static_cast<uint32_t>(sub * 64 * 128);

      // S^T = K Q^T and dP^T = V dO^T, issued together.
      float s[1][8][4];
      float dp[8][4];
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        WgmmaSS<64>(s[0], DescKMajor(k_rows, Tr::kBN, kk), DescKMajor(q_sub, kBM, kk), kk > 0);
      }
      WgmmaCommit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        WgmmaSS<64>(dp, DescKMajor(v_rows, Tr::kBN, kk), DescKMajor(do_sub, kBM, kk), kk > 0);
      }
      WgmmaCommit();
      WgmmaWait<1>();  // S^T is done
      PinAccumulator<8>(s[0]);
      // P^T (the dK/dV kernel's masking rule, attention_backward_dkdv.cuh).
      const bool need_mask = seg != nullptr || qs0 + 64 > seq ||
                             (p.causal ? k0 + Tr::kBN - 1 > qs0 : k0 + Tr::kBN > seq);
      ProbsTransposedFused<64>(s[0], p.scale_log2, need_mask, p.causal, warp_k0, qs0, seq,
                               lse2 + sub * 64,
                               seg != nullptr ? sseg + buf * kBM + sub * 64 : nullptr, kseg, lane);
      uint32_t pa[4][4];
      PackAll<64>(pa, s[0]);
      // dV += P^T dO goes to the tensor cores behind dP^T while dS^T is computed.
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) WgmmaRS<kD>(dv, pa[kk], DescMnMajor(do_sub, kBM, kk), 1);
      WgmmaCommit();
      WgmmaWait<1>();  // dP^T is done
      PinAccumulator<8>(dp);
      const int t = lane & 3;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dp[nt][e] = s[0][nt][e] * (dp[nt][e] - delta[sub * 64 + nt * 8 + 2 * t + (e & 1)]);
        }
      uint32_t da[4][4];
      PackAll<64>(da, dp);  // dS^T

      // dK += dS^T Q. (Left running into the next step, dK and dV serialize: ptxas does not
      // follow accumulators in flight across a loop's back edge.)
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) WgmmaRS<kD>(dk, da[kk], DescMnMajor(q_sub, kBM, kk), 1);
      WgmmaCommit();
      WgmmaWait<0>();
    }
  }
  PinAccumulator<kD / 8>(dv);
  PinAccumulator<kD / 8>(dk);

  // The group's K and V rows were read only by its own (completed) wgmmas: stage the results.
  StoreAccSwizzled<kD>(smem, Tr::kBN, group * 64, dk, p.scale, p.scale, warp, lane);
  StoreAccSwizzled<kD>(smem + Tr::kKVBytes, Tr::kBN, group * 64, dv, 1.f, 1.f, warp, lane);
  __syncthreads();
  StoreTileSwizzled<Tr::kBN, kD, Tr::kThreads>(
      p.dk + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD, p.k_stride, k0, seq, smem,
      tid);
  StoreTileSwizzled<Tr::kBN, kD, Tr::kThreads>(
      p.dv + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD, p.v_stride, k0, seq,
      smem + Tr::kKVBytes, tid);
}

// ------------------------------------------------------------------------------------------
// dQ: one block per (batch, query head, tile of kBM = 64 * kGroups query rows); the block walks
// the visible key tiles (kBN keys, K and V double-buffered).
// ------------------------------------------------------------------------------------------
template <int kD, int kGroups, int kBN>
struct DqTraits {
  static constexpr int kThreads = kGroups * 128;
  static constexpr int kBM = kGroups * 64;
  static constexpr uint32_t kQBytes = kBM * kD * 2;   // Q or dO tile
  static constexpr uint32_t kKVBytes = kBN * kD * 2;  // one K or V buffer
  static constexpr uint32_t kSegOffset = 2 * kQBytes + 4 * kKVBytes;
  // Q | dO | K[2] | V[2] | key segment ids [2][kBN], + align
  static constexpr size_t kSmemBytes = kSegOffset + 2 * kBN * sizeof(int32_t) + 1024;
};

// grid: x = b * Hq + h, y = query tiles (reversed: the tiles with the most keys start first).
template <int kD, int kGroups, int kBN, int kMinBlocks>
__global__ void __launch_bounds__(kGroups * 128, kMinBlocks) DqKernel(const BwdParams p) {
  using Tr = DqTraits<kD, kGroups, kBN>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char* smem = smem_raw + pad;
  const uint32_t sq = raw_addr + pad;
  const uint32_t sdo = sq + Tr::kQBytes;
  const uint32_t sk = sdo + Tr::kQBytes;                              // [2]
  const uint32_t sv = sk + 2 * Tr::kKVBytes;                          // [2]
  int32_t* sseg = reinterpret_cast<int32_t*>(smem + Tr::kSegOffset);  // [2][kBN]

  const int seq = p.seq;
  const QueryTile qt = QueryTileOfBlock(p.q_heads, p.group, Tr::kBM);
  const int bh = qt.bh, b = qt.b, h = qt.h, kvh = qt.kvh, q0 = qt.q0;
  const int tid = threadIdx.x;
  const int group = tid >> 7;
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_q0 = q0 + group * 64 + warp * 16;

  const int64_t b_tokens = static_cast<int64_t>(b) * seq;
  const bf16* q = p.q + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD;
  const bf16* dout = p.dout + b_tokens * p.o_stride + static_cast<int64_t>(h) * kD;
  const bf16* k = p.k + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + b_tokens;
  auto load_kv = [&](int j, int buf) {  // key tile j into buffer buf
    LoadTileSwizzled<kBN, kD, Tr::kThreads>(sk + buf * Tr::kKVBytes, k, p.k_stride, j * kBN, seq,
                                            tid);
    LoadTileSwizzled<kBN, kD, Tr::kThreads>(sv + buf * Tr::kKVBytes, v, p.v_stride, j * kBN, seq,
                                            tid);
    CpAsyncCommit();
    if (seg != nullptr)
      StoreKeySegments(sseg + buf * kBN, seg, j * kBN, kBN, seq, tid, Tr::kThreads);
  };
  LoadTileSwizzled<Tr::kBM, kD, Tr::kThreads>(sq, q, p.q_stride, q0, seq, tid);
  LoadTileSwizzled<Tr::kBM, kD, Tr::kThreads>(sdo, dout, p.o_stride, q0, seq, tid);
  load_kv(0, 0);  // the first group holds Q, dO and key tile 0

  float lse2[2];
  float delta[2];
  int qseg[1][2];
  LoadRowStats(lse2, delta, qseg[0], p, bh, seg, warp_q0 + g, seq);

  float dq[kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

  const uint32_t q_rows = sq + static_cast<uint32_t>(group * 64 * 128);
  const uint32_t do_rows = sdo + static_cast<uint32_t>(group * 64 * 128);
  const int num_ktiles = CeilDiv(p.causal ? min(q0 + Tr::kBM, seq) : seq, kBN);
  for (int j = 0; j < num_ktiles; ++j) {
    const int buf = j & 1;
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();  // tile j is visible to all; everyone is done with buffer buf ^ 1
    if (j + 1 < num_ktiles) load_kv(j + 1, buf ^ 1);
    const uint32_t k_tile = sk + buf * Tr::kKVBytes;
    const uint32_t v_tile = sv + buf * Tr::kKVBytes;

    // The key tile in sub-tiles of 64 keys (the accumulators' width), one barrier and one round
    // of loads for all of them.
#pragma unroll 1
    for (int sub = 0; sub < kBN / 64; ++sub) {
      const int k0 = j * kBN + sub * 64;
      if (p.causal && k0 > q0 + Tr::kBM - 1) continue;  // no query of the block sees these keys
      const uint32_t k_sub = k_tile + static_cast<uint32_t>(sub * 64 * 128);
      const uint32_t v_sub = v_tile + static_cast<uint32_t>(sub * 64 * 128);

      // S = Q K^T and dP = dO V^T, issued together.
      float s[1][8][4];
      float dp[8][4];
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        WgmmaSS<64>(s[0], DescKMajor(q_rows, Tr::kBM, kk), DescKMajor(k_sub, kBN, kk), kk > 0);
      }
      WgmmaCommit();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        WgmmaSS<64>(dp, DescKMajor(do_rows, Tr::kBM, kk), DescKMajor(v_sub, kBN, kk), kk > 0);
      }
      WgmmaCommit();
      WgmmaWait<1>();  // S is done
      PinAccumulator<8>(s[0]);
      const bool need_mask = seg != nullptr || (p.causal ? k0 + 63 > warp_q0 : k0 + 64 > seq);
      ProbsFused<64>(s[0], p.scale_log2, need_mask, p.causal, warp_q0, k0, seq,
                     seg != nullptr ? sseg + buf * kBN + sub * 64 : nullptr, qseg[0], lse2,
                     lane);  // P
      WgmmaWait<0>();        // dP is done
      PinAccumulator<8>(dp);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[nt][e] = s[0][nt][e] * (dp[nt][e] - delta[e >> 1]);
      uint32_t da[4][4];
      PackAll<64>(da, dp);  // dS

      // dQ += dS K
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) WgmmaRS<kD>(dq, da[kk], DescMnMajor(k_sub, kBN, kk), 1);
      WgmmaCommit();
      WgmmaWait<0>();
    }
  }
  PinAccumulator<kD / 8>(dq);

  // The group's Q rows were read only by its own (completed) wgmmas: stage dQ there.
  StoreAccSwizzled<kD>(smem, Tr::kBM, group * 64, dq, p.scale, p.scale, warp, lane);
  __syncthreads();
  StoreTileSwizzled<Tr::kBM, kD, Tr::kThreads>(
      p.dq + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD, p.q_stride, q0, seq, smem, tid);
}

template <typename Kernel>
cudaError_t SetSmem(Kernel* kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <int kD, int kDkdvGroups, int kDkdvBM, int kDqGroups, int kDqBN, int kDkdvMin = 1,
          int kDqMin = 1>
cudaError_t Launch(cudaStream_t stream, const BwdParams& p, int64_t batch) {
  using DkdvTr = DkdvTraits<kD, kDkdvGroups, kDkdvBM>;
  using DqTr = DqTraits<kD, kDqGroups, kDqBN>;
  const int64_t key_tiles = CeilDiv(p.seq, DkdvTr::kBN);
  const int64_t query_tiles = CeilDiv(p.seq, DqTr::kBM);
  if (batch * p.q_heads > 0x7fffffff || key_tiles > 65535 || query_tiles > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  auto* dkdv = DkdvKernel<kD, kDkdvGroups, kDkdvBM, kDkdvMin>;
  auto* dq = DqKernel<kD, kDqGroups, kDqBN, kDqMin>;
  cudaError_t err = SetSmem(dkdv, DkdvTr::kSmemBytes);
  if (err == cudaSuccess) err = SetSmem(dq, DqTr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 dkdv_grid(static_cast<unsigned>(batch * p.kv_heads), static_cast<unsigned>(key_tiles));
  dkdv<<<dkdv_grid, DkdvTr::kThreads, DkdvTr::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 dq_grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(query_tiles));
  dq<<<dq_grid, DqTr::kThreads, DqTr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sm90

cudaError_t AttentionBackwardSm90(cudaStream_t stream, const BwdParams& p, int64_t batch,
                                  int head_dim) {
  // Measured on an H100 (docs/benchmarks.md). D = 64: one warpgroup per block (the products are
  // short, so independent blocks keep the tensor cores fed); dK/dV over 64 keys stepping 128
  // queries, two blocks per SM; dQ over 64 queries stepping 64 keys, three blocks per SM (152
  // registers, 48 KiB of shared memory each: 183 against 167 TFLOP/s with two blocks stepping
  // 128). D = 128: two warpgroups, 128-row blocks stepping 128 rows. Steps of 128 halve the
  // barriers and loads per product.
  switch (head_dim) {
    case 64:
      return sm90::Launch<64, 1, 128, 1, 64, 2, 3>(stream, p, batch);
    case 128:
      return sm90::Launch<128, 2, 128, 2, 128>(stream, p, batch);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda::attn
