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
//
// Fused dQ (the default; BwdParams::dq_acc set): the dK/dV kernel also computes dQ = dS K for
// every 64-query sub-tile it visits (dS^T goes through shared memory as the transposed A
// operand; with two math warpgroups each takes 64 columns of dQ) and no dQ kernel runs: 5
// products per (query, key) tile instead of 7. A further warpgroup of the block (one of its warps,
// with 24 registers) adds these parts into f32 partial sums in global memory
// (DqAccIndex's layout) while the first computes: the part is staged in shared memory and one
// thread moves it with a bulk copy (the first key tile) or a bulk f32 add at the L2 (the
// others), so the math warpgroup neither issues the additions nor waits for them. For
// determinism the key tiles of a (batch, head, query sub-tile) add in key-tile order 0, 1, ..:
// a counter per sub-tile says how many have, and key tile n's writer waits until it reads n.
// Blocks take their key tiles from a ticket counter, so a block only waits for blocks that are
// already running; every block walks its query tiles from the last one down with the heads
// inner, so all key tiles reach a sub-tile at about the same time. DqConvertKernel then writes
// dQ in bf16 (times the softmax scale). A second warp of that warpgroup loads each step's Q and
// dO tiles with TMA (and the query statistics with plain stores) into two buffers guarded by
// mbarriers, so the math warpgroups issue no loads and meet at no barrier between steps.
#include <cuda.h>
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

// The ordering counters: an acquiring load, and a releasing store at GPU scope that also orders
// the thread's completed bulk (async-proxy) writes before it.
__device__ __forceinline__ int32_t LoadAcquireGpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void StoreReleaseGpu(int32_t* p, int32_t v) {
  asm volatile(
      "fence.proxy.async.global;\nfence.acq_rel.gpu;\nst.relaxed.gpu.global.b32 [%0], %1;\n" ::"l"(
          p),
      "r"(v)
      : "memory");
}
// Bulk copy (add = false) or f32 add (add = true) of `bytes` bytes from shared to global memory,
// in a bulk group of this thread; then WaitRead (the source may be reused) or Wait (done).
__device__ __forceinline__ void BulkToGlobal(float* dst, uint32_t src, uint32_t bytes, bool add) {
  if (add) {
    asm volatile(
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
        "r"(src), "r"(bytes)
        : "memory");
  } else {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst),
                 "r"(src), "r"(bytes)
                 : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
__device__ __forceinline__ void BulkWait() {
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

// Fused dQ's f32 partial sums: [B * Hq][dq_tiles * 64 rows][kD columns], column c of row r at
// r * kD + (c ^ 8 * (r % 4)) (the permutation makes the staging stores conflict-free; the bulk
// additions do not care, DqConvertKernel undoes it; 8 columns from c = 8k stay together).
template <int kD>
__host__ __device__ constexpr int64_t DqAccIndex(int64_t bh, int dq_tiles, int row, int col) {
  return (bh * dq_tiles * 64 + row) * kD + (col ^ ((row & 3) << 3));
}
// A warpgroup's 64 x 64 dQ part (columns col0 ..) into the staging tile of a sub-tile's 64 x kD
// (f32, DqAccIndex's layout within a tile).
template <int kD>
__device__ __forceinline__ void StageDqPart(float* stage, const float (&part)[8][4], int col0,
                                            int warp, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = warp * 16 + g + 8 * hf;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = (col0 + i * 8 + 2 * t) ^ ((row & 3) << 3);
      *reinterpret_cast<float2*>(stage + row * kD + col) =
          make_float2(part[i][2 * hf], part[i][2 * hf + 1]);
    }
  }
}

// dQ (bf16, token stride q_stride) = scale * the partial sums; a thread per 8 elements of a
// row, grid.y = batch * Hq (its rows one after the other, so the reads are contiguous).
template <int kD>
__global__ void DqConvertKernel(const BwdParams p) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= p.seq * (kD / 8)) return;
  const int t = i / (kD / 8);
  const int c = (i % (kD / 8)) * 8;
  const int bh = static_cast<int>(blockIdx.y);
  const int b = bh / p.q_heads;
  const int h = bh - b * p.q_heads;
  const float4* src =
      reinterpret_cast<const float4*>(p.dq_acc + DqAccIndex<kD>(bh, p.dq_tiles, t, c));
  const float4 x = __ldcs(src), y = __ldcs(src + 1);
  uint4 out;
  out.x = PackBf16x2(x.x * p.scale, x.y * p.scale);
  out.y = PackBf16x2(x.z * p.scale, x.w * p.scale);
  out.z = PackBf16x2(y.x * p.scale, y.y * p.scale);
  out.w = PackBf16x2(y.z * p.scale, y.w * p.scale);
  bf16* dq = p.dq + (static_cast<int64_t>(b) * p.seq + t) * p.q_stride + h * kD + c;
  *reinterpret_cast<uint4*>(dq) = out;
}

// ------------------------------------------------------------------------------------------
// dK, dV: one block per (batch, kv head, tile of kBN = 64 * kGroups keys); the block walks the
// query tiles (kBM rows) of every query head of the group that can see the tile, in order
// (fused dQ: the last query tile first, the heads inner).
// ------------------------------------------------------------------------------------------
template <int kD, int kGroups, int kBM, bool kFusedDq>
struct DkdvTraits {
  static constexpr int kThreads = kGroups * 128;  // the math warpgroups
  static constexpr int kBN = kGroups * 64;
  static constexpr uint32_t kKVBytes = kBN * kD * 2;                   // K or V tile
  static constexpr uint32_t kQBytes = kBM * kD * 2;                    // one Q or dO buffer
  static constexpr uint32_t kDsBytes = kFusedDq ? kBN * 64 * 2 : 0;    // dS^T of a sub-tile
  static constexpr uint32_t kStageBytes = kFusedDq ? 64 * kD * 4 : 0;  // its dQ, f32
  static constexpr uint32_t kStatsOffset = 2 * kKVBytes + 4 * kQBytes + kDsBytes + kStageBytes;
  // K | V | Q[2] | dO[2] | dS^T | dQ part | lse2[2][kBM] | delta[2][kBM] | query segment ids
  // [2][kBM] | fused dQ: the Q/dO buffers' full[2] and empty[2] mbarriers, + align
  static constexpr uint32_t kBarOffset = kStatsOffset + 2 * kBM * 12;
  static constexpr size_t kSmemBytes = kBarOffset + 4 * 8 + 1024;
};

// Fused dQ's barriers: the math warpgroups' own, and the staging tile's "full" (math -> writer)
// and "empty" (writer -> math) handshakes between them and the writer warp; the writer
// warpgroup's registers a thread.
constexpr int kMathBarrier = 1, kFullBarrier = 2, kEmptyBarrier = 3;
constexpr int kWriterRegs = 24;
// The math warpgroups' registers a thread once the writer warpgroup has given up its own
// (setmaxnreg; two blocks an SM with one math warpgroup, one block with two).
constexpr int MathRegs(int groups) { return groups == 1 ? 232 : 240; }

// The dK/dV kernel's parameters: with fused dQ, the tensor maps its loader warp reads Q and dO
// through (boxes of 64 columns x kBM queries; 64-byte aligned, first), unused otherwise.
struct DkdvParams {
  CUtensorMap tq;
  CUtensorMap tdo;
  BwdParams p;
};

// grid: x = b * Hkv + kv head, y = key tiles (tile 0, which sees the most queries, starts first;
// fused dQ: the blocks take (x, y) from p.dq_ticket in that order, and a second warpgroup, of
// which one warp adds the dQ parts and one loads Q and dO).
template <int kD, int kGroups, int kBM, int kMinBlocks, bool kFusedDq>
__global__ void __launch_bounds__(kGroups * 128 + (kFusedDq ? 128 : 0), kMinBlocks)
    DkdvKernel(const __grid_constant__ DkdvParams dp) {
  using Tr = DkdvTraits<kD, kGroups, kBM, kFusedDq>;
  const BwdParams& p = dp.p;
  static_assert(!kFusedDq || kD == 64 * kGroups, "fused dQ: each math warpgroup takes 64 columns");
  constexpr int kHandshakeThreads = Tr::kThreads + 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char* smem = smem_raw + pad;
  const uint32_t sk = raw_addr + pad;
  const uint32_t sv = sk + Tr::kKVBytes;
  const uint32_t sq = sv + Tr::kKVBytes;                             // [2]
  const uint32_t sdo = sq + 2 * Tr::kQBytes;                         // [2]
  const uint32_t sds = sdo + 2 * Tr::kQBytes;                        // dS^T [kBN][64] bf16
  const uint32_t sstage = sds + Tr::kDsBytes;                        // dQ part [64][64] f32
  float* slse2 = reinterpret_cast<float*>(smem + Tr::kStatsOffset);  // [2][kBM]
  float* sdelta = slse2 + 2 * kBM;                                   // [2][kBM]
  int32_t* sseg = reinterpret_cast<int32_t*>(sdelta + 2 * kBM);      // [2][kBM]
  // Fused dQ: buffer `buf` of Q, dO and the query statistics is full (loaded) or empty (every
  // math warp is done with it).
  const uint32_t bars = sk + Tr::kBarOffset;
  auto full = [&](int buf) { return bars + 8u * buf; };
  auto empty = [&](int buf) { return bars + 8u * (2 + buf); };

  int block_x = static_cast<int>(blockIdx.x), block_y = static_cast<int>(blockIdx.y);
  if constexpr (kFusedDq) {
    __shared__ int work;
    if (threadIdx.x == 0) {
      work = atomicAdd(p.dq_ticket, 1);
      for (int buf = 0; buf < 2; ++buf) {
        MbarInit(full(buf), 1);
        MbarInit(empty(buf), kGroups * 4);  // one arrival per math warp
      }
      MbarInitFence();
    }
    __syncthreads();
    block_x = work % static_cast<int>(gridDim.x);
    block_y = work / static_cast<int>(gridDim.x);
  }
  const int seq = p.seq;
  const int b = block_x / p.kv_heads;
  const int kvh = block_x % p.kv_heads;
  const int k0 = block_y * Tr::kBN;
  // Iteration it visits query head kvh * group + it / nq, query tile qt_first + it % nq (fused
  // dQ: head kvh * group + it % group, query tile qt_first + nq - 1 - it / group).
  const int qt_first = p.causal ? k0 / kBM : 0;  // causal: queries before k0 see no key here
  const int nq = CeilDiv(seq, kBM) - qt_first;
  const int iters = p.group * nq;
  auto head_of = [&](int it) { return kvh * p.group + (kFusedDq ? it % p.group : it / nq); };
  auto tile_of = [&](int it) {
    return kFusedDq ? qt_first + nq - 1 - it / p.group : qt_first + it % nq;
  };
  // The math threads' barrier (all threads' without fused dQ).
  auto math_sync = [] {
    if constexpr (kFusedDq) {
      NamedBarrierSync(kMathBarrier, Tr::kThreads);
    } else {
      __syncthreads();
    }
  };

  const int64_t b_tokens = static_cast<int64_t>(b) * seq;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + b_tokens;

  if constexpr (kFusedDq) {
    if (threadIdx.x >= Tr::kThreads) {  // the writer warpgroup: warp 0 adds, warp 1 loads
      SetMaxRegsDec<kWriterRegs>();
      if (threadIdx.x >= Tr::kThreads + 64) return;
      if (threadIdx.x >= Tr::kThreads + 32) {
        // The loader: Q and dO of iteration it by TMA into buffer it & 1, the query statistics
        // by plain stores published by the arrival on the buffer's full barrier.
        const int lane = threadIdx.x & 31;
        for (int it = 0; it < iters; ++it) {
          const int buf = it & 1;
          if (it >= 2) MbarWait(empty(buf), ((it >> 1) - 1) & 1);
          const int h = head_of(it);
          const int qs = tile_of(it) * kBM;
          const int64_t stats = b_tokens * p.q_heads + static_cast<int64_t>(h) * seq;
          StoreQueryStats(slse2 + buf * kBM, sdelta + buf * kBM, sseg + buf * kBM, p, stats, seg,
                          qs, kBM, seq, lane, 32);
          __syncwarp();
          if (lane == 0) {
            MbarArriveExpectTx(full(buf), 2 * Tr::kQBytes);
#pragma unroll
            for (int c = 0; c < kD / 64; ++c) {
              TmaLoad4d(sq + buf * Tr::kQBytes + c * kBM * 128, &dp.tq, c * 64, h, qs, b,
                        full(buf));
              TmaLoad4d(sdo + buf * Tr::kQBytes + c * kBM * 128, &dp.tdo, c * 64, h, qs, b,
                        full(buf));
            }
          }
        }
        return;
      }
      const int lane = threadIdx.x & 31;
      const int last_tile = static_cast<int>(gridDim.y) - 1;
      NamedBarrierArrive(kEmptyBarrier, kHandshakeThreads);  // the staging tile starts free
      for (int it = 0; it < iters; ++it) {
        for (int sub = 0; sub < kBM / 64; ++sub) {
          const int qs0 = tile_of(it) * kBM + sub * 64;
          if (p.causal && qs0 + 63 < k0) continue;  // as the math warpgroup
          const int last = p.causal ? min(last_tile, (qs0 + 63) / Tr::kBN) : last_tile;
          const int64_t bh = static_cast<int64_t>(b) * p.q_heads + head_of(it);
          int32_t* sem = p.dq_sem + bh * p.dq_tiles + qs0 / 64;
          NamedBarrierSync(kFullBarrier, kHandshakeThreads);  // the part is staged
          if (lane == 0) {
            while (LoadAcquireGpu(sem) != block_y) {
            }
            asm volatile("fence.proxy.async.global;\n" ::: "memory");
            BulkToGlobal(p.dq_acc + DqAccIndex<kD>(bh, p.dq_tiles, qs0, 0), sstage, Tr::kStageBytes,
                         block_y > 0);
            BulkWaitRead();
          }
          __syncwarp();
          NamedBarrierArrive(kEmptyBarrier, kHandshakeThreads);
          if (lane == 0) {
            BulkWait();
            if (block_y < last) StoreReleaseGpu(sem, block_y + 1);
          }
        }
      }
      return;
    }
    SetMaxRegsInc<MathRegs(kGroups)>();
  }
  const int tid = threadIdx.x;
  const int group = tid >> 7;
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_k0 = k0 + group * 64 + warp * 16;  // the warp's first key

  const bf16* k = p.k + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;

  auto load_q = [&](int it, int buf) {
    const int h = head_of(it);
    const int qs = tile_of(it) * kBM;
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
  if constexpr (kFusedDq) {
    CpAsyncCommit();
    CpAsyncWaitAll();
    FenceProxyAsync();
    math_sync();  // K and V are visible
  } else {
    load_q(0, 0);  // the first group holds K, V and the first Q, dO tiles
  }

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
    if constexpr (kFusedDq) {
      MbarWait(full(buf), (it >> 1) & 1);
    } else {
      CpAsyncWaitAll();
      FenceProxyAsync();
      math_sync();  // iteration it's tiles are visible; everyone is done with buffer buf ^ 1
      if (it + 1 < iters) load_q(it + 1, buf ^ 1);
    }
    const int q0 = tile_of(it) * kBM;
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
      if constexpr (kFusedDq) {
        // dS^T to shared memory for dQ, rounded to bf16 as da is.
        StoreAccSwizzled<64>(smem + (sds - sk), Tr::kBN, group * 64, dp, 1.f, 1.f, warp, lane);
        FenceProxyAsync();
      }

      // dK += dS^T Q. (Left running into the next step, dK and dV serialize: ptxas does not
      // follow accumulators in flight across a loop's back edge.)
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) WgmmaRS<kD>(dk, da[kk], DescMnMajor(q_sub, kBM, kk), 1);
      WgmmaCommit();
      if constexpr (kFusedDq) {
        // This warpgroup's 64 columns of dQ = dS K over the tile's kBN keys, staged for the
        // writer warp.
        math_sync();  // dS^T is complete
        float dq_part[8][4];
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < Tr::kBN / 16; ++kk) {
          WgmmaSSTransposed<64>(dq_part, DescMnMajor(sds, Tr::kBN, kk),
                                DescMnMajor(sk + group * Tr::kBN * 128, Tr::kBN, kk), kk > 0);
        }
        WgmmaCommit();
        WgmmaWait<0>();
        PinAccumulator<8>(dq_part);
        NamedBarrierSync(kEmptyBarrier, kHandshakeThreads);  // the last part has been read
        StageDqPart<kD>(reinterpret_cast<float*>(smem + (sstage - sk)), dq_part, group * 64, warp,
                        lane);
        FenceProxyAsync();
        NamedBarrierArrive(kFullBarrier, kHandshakeThreads);
      } else {
        WgmmaWait<0>();
      }
    }
    if constexpr (kFusedDq) {  // this warp's products and reads of buffer buf have completed
      __syncwarp();
      if (lane == 0) MbarArrive(empty(buf));
    }
  }
  if constexpr (kFusedDq) {
    NamedBarrierSync(kEmptyBarrier, kHandshakeThreads);  // the writer's last arrival
  }
  PinAccumulator<kD / 8>(dv);
  PinAccumulator<kD / 8>(dk);

  // The group's K and V rows were read only by its own (completed) wgmmas: stage the results.
  StoreAccSwizzled<kD>(smem, Tr::kBN, group * 64, dk, p.scale, p.scale, warp, lane);
  StoreAccSwizzled<kD>(smem + Tr::kKVBytes, Tr::kBN, group * 64, dv, 1.f, 1.f, warp, lane);
  math_sync();
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
cudaError_t Launch(cudaStream_t stream, const BwdParams& p, int64_t batch, size_t sem_bytes) {
  using DqTr = DqTraits<kD, kDqGroups, kDqBN>;
  const int64_t key_tiles = CeilDiv(p.seq, kDkdvGroups * 64);
  const int64_t query_tiles = CeilDiv(p.seq, DqTr::kBM);
  if (batch * p.q_heads > 0x7fffffff || key_tiles > 65535 || query_tiles > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 dkdv_grid(static_cast<unsigned>(batch * p.kv_heads), static_cast<unsigned>(key_tiles));
  if (p.dq_acc != nullptr && batch * p.q_heads <= 65535) {
    // Fused dQ (DqConvertKernel's grid.y is batch * Hq: more takes the split kernels). Head dim
    // 128 steps 64 queries: its staging tile would not fit beside two 128-row Q and dO buffers.
    constexpr int kBM = kD == 64 ? kDkdvBM : 64;
    constexpr int kMin = kD == 64 ? kDkdvMin : 1;
    // The counters and sums must cover every 64-query sub-tile of the kBM-row steps.
    if (p.dq_tiles < CeilDiv(p.seq, kBM) * (kBM / 64)) return cudaErrorInvalidValue;
    using Tr = DkdvTraits<kD, kDkdvGroups, kBM, true>;
    auto* fused = DkdvKernel<kD, kDkdvGroups, kBM, kMin, true>;
    DkdvParams dp{};
    dp.p = p;
    cudaError_t err = EncodeOperandMap(&dp.tq, p.q, kD, p.q_heads, p.q_stride, p.seq, batch, kBM);
    if (err == cudaSuccess) {
      err = EncodeOperandMap(&dp.tdo, p.dout, kD, p.q_heads, p.o_stride, p.seq, batch, kBM);
    }
    if (err == cudaSuccess) err = SetSmem(fused, Tr::kSmemBytes);
    if (err == cudaSuccess) err = cudaMemsetAsync(p.dq_sem, 0, sem_bytes, stream);
    if (err != cudaSuccess) return err;
    fused<<<dkdv_grid, Tr::kThreads + 128, Tr::kSmemBytes, stream>>>(dp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const dim3 convert_grid(static_cast<unsigned>(CeilDiv(p.seq * (kD / 8), 256)),
                            static_cast<unsigned>(batch * p.q_heads));
    DqConvertKernel<kD><<<convert_grid, 256, 0, stream>>>(p);
    return cudaGetLastError();
  }
  using DkdvTr = DkdvTraits<kD, kDkdvGroups, kDkdvBM, false>;
  auto* dkdv = DkdvKernel<kD, kDkdvGroups, kDkdvBM, kDkdvMin, false>;
  auto* dq = DqKernel<kD, kDqGroups, kDqBN, kDqMin>;
  cudaError_t err = SetSmem(dkdv, DkdvTr::kSmemBytes);
  if (err == cudaSuccess) err = SetSmem(dq, DqTr::kSmemBytes);
  if (err != cudaSuccess) return err;
  DkdvParams dp{};
  dp.p = p;
  dkdv<<<dkdv_grid, DkdvTr::kThreads, DkdvTr::kSmemBytes, stream>>>(dp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 dq_grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(query_tiles));
  dq<<<dq_grid, DqTr::kThreads, DqTr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sm90

cudaError_t AttentionBackwardSm90(cudaStream_t stream, const BwdParams& p, int64_t batch,
                                  int head_dim, size_t sem_bytes) {
  // Measured on an H100 (docs/benchmarks.md). D = 64: one warpgroup per block (the products are
  // short, so independent blocks keep the tensor cores fed); dK/dV over 64 keys stepping 128
  // queries, two blocks per SM; dQ over 64 queries stepping 64 keys, three blocks per SM (152
  // registers, 48 KiB of shared memory each: 183 against 167 TFLOP/s with two blocks stepping
  // 128). D = 128: two warpgroups, 128-row blocks stepping 128 rows. Steps of 128 halve the
  // barriers and loads per product.
  switch (head_dim) {
    case 64:
      return sm90::Launch<64, 1, 128, 1, 64, 2, 3>(stream, p, batch, sem_bytes);
    case 128:
      return sm90::Launch<128, 2, 128, 2, 128>(stream, p, batch, sem_bytes);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda::attn
