// Fused causal grouped-query attention, forward kernel (FlashAttention-2 scheme), bf16,
// D in {64, 128}. Private to attention_forward.cu.
//
// One block per (batch, query head, tile of kBM query rows); each warp owns kMT x 16 rows of the
// tile. The block walks the key tiles (kBN keys) that its rows can see, double-buffering K and V
// with cp.async: S = Q K^T on the tensor cores, online softmax in f32 in the log2 domain
// (x = s * scale * log2(e), exp2 on the SFU), O += P V with P rounded to bf16 in registers. The
// [T, T] score matrix never leaves registers. Causal: key tiles entirely after the tile's last
// row are never visited; masking is applied only on tiles that cross the diagonal (or always,
// with segment ids). Rows >= T are computed on zero-filled Q and never written.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_common.cuh"

namespace tandem::ops::cuda::attn {

struct FwdParams {
  bf16* out;           // [B, T, Hq, D], token stride o_stride
  float* lse;          // [B, Hq, T]
  const bf16* q;       // [B, T, Hq, D], token stride q_stride
  const bf16* k;       // [B, T, Hkv, D], token stride k_stride
  const bf16* v;       // [B, T, Hkv, D], token stride v_stride
  const int32_t* seg;  // [B, T] or nullptr
  int64_t q_stride, k_stride, v_stride, o_stride;
  int seq, q_heads, group;  // group = Hq / Hkv
  bool causal;              // false: every key visible (a full block of a ring)
  float scale_log2;         // scale * log2(e)
};

template <int kD, int kWarps, int kMT, int kBN>
struct FwdTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = 16 * kMT;
  static constexpr int kBM = kWarps * kWarpRows;  // query rows per block
  static constexpr int kPitch = kD + kSmemPad;
  static constexpr int kQElems = kBM * kPitch;
  static constexpr int kKVElems = kBN * kPitch;  // one K or V buffer
  // Q | K[2] | V[2] | key segment ids [2][kBN]
  static constexpr size_t kSmemBytes =
      (kQElems + 4 * kKVElems) * sizeof(bf16) + 2 * kBN * sizeof(int32_t);
};

// Online softmax over one key tile: updates the running max m (log2 domain) and the lane's
// partial row sums l, rescales o, and turns s into p = 2^(x - m). Each row's kBN columns live in
// the 4 lanes of a quad (lanes 4g .. 4g+3), so row reductions are two xor-shuffles.
// A row that has seen no visible key yet keeps m = -inf; it then uses 0 as the offset so that
// 2^(-inf - offset) = 0 and no inf - inf arises.
template <int kD, int kMT, int kBN>
__device__ __forceinline__ void SoftmaxUpdate(float (&s)[kMT][kBN / 8][4], float (&m)[kMT][2],
                                              float (&l)[kMT][2], float (&o)[kMT][kD / 8][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {  // hf 0: row g (c0, c1), hf 1: row g + 8 (c2, c3)
      float mx = m[mt][hf];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float offset = mx == -INFINITY ? 0.f : mx;
      const float alpha = Exp2(m[mt][hf] - offset);  // 0 when the old max is -inf
      m[mt][hf] = mx;
      float sum = l[mt][hf] * alpha;
#pragma unroll
      for (int dt = 0; dt < kD / 8; ++dt) {
        o[mt][dt][2 * hf] *= alpha;
        o[mt][dt][2 * hf + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const float p0 = Exp2(s[mt][nt][2 * hf] - offset);
        const float p1 = Exp2(s[mt][nt][2 * hf + 1] - offset);
        s[mt][nt][2 * hf] = p0;
        s[mt][nt][2 * hf + 1] = p1;
        sum += p0 + p1;
      }
      l[mt][hf] = sum;
    }
}

// grid: x = b * Hq + h, y = query tiles (reversed: the tiles with the most keys start first).
template <int kD, int kWarps, int kMT, int kBN>
__global__ void __launch_bounds__(kWarps * 32) AttentionForwardKernel(const FwdParams p) {
  using Tr = FwdTraits<kD, kWarps, kMT, kBN>;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sq = reinterpret_cast<bf16*>(smem);                            // [kBM][pitch]
  bf16* sk = sq + Tr::kQElems;                                         // [2][kBN][pitch]
  bf16* sv = sk + 2 * Tr::kKVElems;                                    // [2][kBN][pitch]
  int32_t* sseg = reinterpret_cast<int32_t*>(sv + 2 * Tr::kKVElems);  // [2][kBN]

  const int seq = p.seq;
  const QueryTile qt = QueryTileOfBlock(p.q_heads, p.group, Tr::kBM);
  const int bh = qt.bh, b = qt.b, h = qt.h, kvh = qt.kvh, q0 = qt.q0;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_row = warp * Tr::kWarpRows;  // the warp's first row inside the tile
  const int warp_q0 = q0 + warp_row;          // ... and its query index

  const bf16* q = p.q + static_cast<int64_t>(b) * seq * p.q_stride + static_cast<int64_t>(h) * kD;
  const bf16* k =
      p.k + static_cast<int64_t>(b) * seq * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v =
      p.v + static_cast<int64_t>(b) * seq * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + static_cast<int64_t>(b) * seq;

  // Starts the loads of key tile j into buffer buf (one cp.async group; segment ids by plain
  // stores, published by the __syncthreads() that precedes the tile's use).
  auto load_kv = [&](int j, int buf) {
    LoadTileAsync<kBN, kD, Tr::kThreads>(sk + buf * Tr::kKVElems, k, p.k_stride, j * kBN, seq,
                                         tid);
    LoadTileAsync<kBN, kD, Tr::kThreads>(sv + buf * Tr::kKVElems, v, p.v_stride, j * kBN, seq,
                                         tid);
    CpAsyncCommit();
    if (seg != nullptr)
      StoreKeySegments(sseg + buf * kBN, seg, j * kBN, kBN, seq, tid, Tr::kThreads);
  };

  LoadTileAsync<Tr::kBM, kD, Tr::kThreads>(sq, q, p.q_stride, q0, seq, tid);
  load_kv(0, 0);  // the first group holds Q and key tile 0

  int qseg[kMT][2] = {};
  if (seg != nullptr) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = warp_q0 + mt * 16 + g + 8 * hf;
        qseg[mt][hf] = row < seq ? seg[row] : 0;
      }
  }

  float o[kMT][kD / 8][4];
  float m[kMT][2];
  float l[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  const uint32_t sq_addr = SmemAddr(sq);
  const int num_ktiles = CeilDiv(p.causal ? min(q0 + Tr::kBM, seq) : seq, kBN);
  for (int j = 0; j < num_ktiles; ++j) {
    const int buf = j & 1;
    CpAsyncWaitAll();
    __syncthreads();  // tile j is visible to all; every warp is done with buffer buf ^ 1
    if (j + 1 < num_ktiles) load_kv(j + 1, buf ^ 1);

    float s[kMT][kBN / 8][4];
    GemmSmemNT<kD, kMT, kBN>(s, sq_addr, warp_row, SmemAddr(sk + buf * Tr::kKVElems), lane);
    const int k0 = j * kBN;
    // Masking is needed where the tile crosses the diagonal (this also covers keys >= seq,
    // which only the last tile has and which lie beyond every row < seq), without the causal
    // mask on the last tile when it runs past the sequence, or with segments.
    const bool need_mask =
        seg != nullptr || (p.causal ? k0 + kBN - 1 > q0 : k0 + kBN > seq);
    ScaleAndMaskRows<kMT, kBN>(s, p.scale_log2, need_mask, p.causal, warp_q0, k0, seq,
                               seg != nullptr ? sseg + buf * kBN : nullptr, qseg, lane);
    SoftmaxUpdate<kD, kMT, kBN>(s, m, l, o);
    GemmRegSmem<kD, kMT, kBN>(o, s, SmemAddr(sv + buf * Tr::kKVElems), lane);  // O += P V
  }

  // Epilogue: full row sums, lse, O / l through the warp's own rows of sq to 16-byte stores.
  float inv[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = l[mt][hf];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[mt][hf] = sum > 0.f ? 1.f / sum : 0.f;  // a row with no visible key gets out = 0
      const int row = warp_q0 + mt * 16 + g + 8 * hf;
      if ((lane & 3) == 0 && row < seq) {
        p.lse[static_cast<int64_t>(bh) * seq + row] =
            sum > 0.f ? (m[mt][hf] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  __syncwarp();  // the warp's ldmatrix reads of its Q rows are done before they are overwritten
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    StoreAccToSmem<kD>(sq + (warp_row + mt * 16) * Tr::kPitch, o[mt], inv[mt][0], inv[mt][1],
                       lane);
  }
  __syncwarp();
  bf16* out = p.out + static_cast<int64_t>(b) * seq * p.o_stride + static_cast<int64_t>(h) * kD;
  StoreRowsFromSmem<Tr::kWarpRows, kD>(out, p.o_stride, warp_q0, seq, sq + warp_row * Tr::kPitch,
                                       lane);
}

}  // namespace tandem::ops::cuda::attn
