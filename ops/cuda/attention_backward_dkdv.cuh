// Attention backward, dK and dV: one block per (batch, kv head, tile of kBN = 16 * kWarps keys);
// each warp owns 16 keys. K and V of the tile stay in shared memory; the block walks, for each
// query head of the kv head's group in order, the query tiles (kBM rows) that can see the tile
// (causal: from the tile holding query k0 on), double-buffering Q, dO, lse and delta with
// cp.async, and recomputes in the transposed orientation (keys as rows):
//   S^T = K Q^T,  P^T = 2^(S^T * scale * log2(e) - lse2[query])
//   dV += P^T dO
//   dP^T = V dO^T,  dS^T = P^T * (dP^T - delta[query])
//   dK += dS^T Q
// dK * scale and dV are written once as bf16: one writer per element and a fixed summation order
// (query heads, then query tiles, ascending), so the result is deterministic. Private to
// attention_backward.cu.
#pragma once

#include "ops/cuda/attention_common.cuh"

namespace tandem::ops::cuda::attn {

template <int kD, int kWarps, int kBM>
struct DkdvTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBN = kWarps * 16;  // keys per block
  static constexpr int kPitch = kD + kSmemPad;
  static constexpr int kKVElems = kBN * kPitch;  // K or V tile
  static constexpr int kQElems = kBM * kPitch;   // one Q or dO buffer
  // K | V | Q[2] | dO[2] | lse2[2][kBM] | delta[2][kBM] | query segment ids [2][kBM]
  static constexpr size_t kSmemBytes = (2 * kKVElems + 4 * kQElems) * sizeof(bf16) +
                                       2 * kBM * (2 * sizeof(float) + sizeof(int32_t));
};

// Scores with keys as rows: x = s * scale * log2(e), -inf where masked, then P^T = 2^(x - lse2).
// s[0][nt][e] is key key_row0 + g + 8*(e/2), query q0 + nt*8 + 2t + e%2. lse2 and qseg (nullptr
// without segments) are the query tile's values in shared memory; kseg the lane's key segments.
template <int kBM>
__device__ __forceinline__ void ProbsTransposed(float (&s)[1][kBM / 8][4], float scale_log2,
                                                bool need_mask, bool causal, int key_row0, int q0,
                                                int seq, const float* lse2, const int32_t* qseg,
                                                const int (&kseg)[2], int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = nt * 8 + 2 * t + (e & 1);  // query inside the tile
      float x = s[0][nt][e] * scale_log2;
      if (need_mask) {
        const int key = key_row0 + g + 8 * (e >> 1);
        const int query = q0 + col;
        bool visible = (causal ? key <= query : key < seq) && query < seq;
        if (qseg != nullptr) visible = visible && qseg[col] == kseg[e >> 1];
        if (!visible) x = -INFINITY;
      }
      s[0][nt][e] = Exp2(x - lse2[col]);
    }
}

// grid: x = b * Hkv + kv head, y = key tiles (tile 0, which sees the most queries, starts first).
template <int kD, int kWarps, int kBM>
__global__ void __launch_bounds__(kWarps * 32) AttentionBackwardDkdvKernel(const BwdParams p) {
  using Tr = DkdvTraits<kD, kWarps, kBM>;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sk = reinterpret_cast<bf16*>(smem);                        // [kBN][pitch]
  bf16* sv = sk + Tr::kKVElems;                                    // [kBN][pitch]
  bf16* sq = sv + Tr::kKVElems;                                    // [2][kBM][pitch]
  bf16* sdo = sq + 2 * Tr::kQElems;                                // [2][kBM][pitch]
  float* slse2 = reinterpret_cast<float*>(sdo + 2 * Tr::kQElems);  // [2][kBM]
  float* sdelta = slse2 + 2 * kBM;                                 // [2][kBM]
  int32_t* sseg = reinterpret_cast<int32_t*>(sdelta + 2 * kBM);   // [2][kBM]

  const int seq = p.seq;
  const int b = blockIdx.x / p.kv_heads;
  const int kvh = blockIdx.x % p.kv_heads;
  const int k0 = blockIdx.y * Tr::kBN;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_row = warp * 16;     // the warp's first key inside the tile
  const int warp_k0 = k0 + warp_row;  // ... and its key index

  const int64_t b_tokens = static_cast<int64_t>(b) * seq;
  const bf16* k = p.k + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + b_tokens;

  // Iteration it visits query head kvh * group + it / nq, query tile qt_first + it % nq.
  const int qt_first = p.causal ? k0 / kBM : 0;  // causal: queries before k0 see no key here
  const int nq = CeilDiv(seq, kBM) - qt_first;
  const int iters = p.group * nq;

  // Starts the loads of iteration it's Q and dO tiles into buffer buf (one cp.async group); its
  // lse2, delta and segment ids go by plain stores, published by the next __syncthreads().
  auto load_q = [&](int it, int buf) {
    const int h = kvh * p.group + it / nq;
    const int qs = (qt_first + it % nq) * kBM;
    const bf16* q = p.q + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD;
    const bf16* dout = p.dout + b_tokens * p.o_stride + static_cast<int64_t>(h) * kD;
    LoadTileAsync<kBM, kD, Tr::kThreads>(sq + buf * Tr::kQElems, q, p.q_stride, qs, seq, tid);
    LoadTileAsync<kBM, kD, Tr::kThreads>(sdo + buf * Tr::kQElems, dout, p.o_stride, qs, seq, tid);
    CpAsyncCommit();
    const int64_t stats = (b_tokens * p.q_heads) + static_cast<int64_t>(h) * seq;  // [b, h, 0]
    StoreQueryStats(slse2 + buf * kBM, sdelta + buf * kBM, sseg + buf * kBM, p, stats, seg, qs, kBM,
                    seq, tid, Tr::kThreads);
  };
  LoadTileAsync<Tr::kBN, kD, Tr::kThreads>(sk, k, p.k_stride, k0, seq, tid);
  LoadTileAsync<Tr::kBN, kD, Tr::kThreads>(sv, v, p.v_stride, k0, seq, tid);
  load_q(0, 0);  // the first group holds K, V and the first Q, dO tiles

  int kseg[2] = {};
  if (seg != nullptr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int key = warp_k0 + g + 8 * hf;
      kseg[hf] = key < seq ? seg[key] : -1;
    }
  }

  float dk[1][kD / 8][4];
  float dv[1][kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[0][dt][e] = dv[0][dt][e] = 0.f;

  const uint32_t sk_addr = SmemAddr(sk);
  const uint32_t sv_addr = SmemAddr(sv);
  for (int it = 0; it < iters; ++it) {
    const int buf = it & 1;
    CpAsyncWaitAll();
    __syncthreads();  // iteration it's tiles are visible; every warp is done with buffer buf ^ 1
    if (it + 1 < iters) load_q(it + 1, buf ^ 1);
    const int q0 = (qt_first + it % nq) * kBM;
    const uint32_t sq_addr = SmemAddr(sq + buf * Tr::kQElems);
    const uint32_t sdo_addr = SmemAddr(sdo + buf * Tr::kQElems);
    const float* lse2 = slse2 + buf * kBM;
    const float* delta = sdelta + buf * kBM;

    float s[1][kBM / 8][4];
    GemmSmemNT<kD, 1, kBM>(s, sk_addr, warp_row, sq_addr, lane);  // S^T = K Q^T
    // Masking where the tiles cross the diagonal, where queries run past the sequence (their
    // lse2 = +inf already zeroes P; the mask makes it explicit) or with segments.
    // Without the causal mask, key rows >= seq (zero-filled, never stored) are masked too, so no
    // inf can arise in rows that are thrown away.
    const bool need_mask = seg != nullptr || q0 + kBM > seq ||
                           (p.causal ? k0 + Tr::kBN - 1 > q0 : k0 + Tr::kBN > seq);
    ProbsTransposed<kBM>(s, p.scale_log2, need_mask, p.causal, warp_k0, q0, seq, lse2,
                         seg != nullptr ? sseg + buf * kBM : nullptr, kseg, lane);  // P^T
    GemmRegSmem<kD, 1, kBM>(dv, s, sdo_addr, lane);  // dV += P^T dO

    float dp[1][kBM / 8][4];
    GemmSmemNT<kD, 1, kBM>(dp, sv_addr, warp_row, sdo_addr, lane);  // dP^T = V dO^T
    const int t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dp[0][nt][e] = s[0][nt][e] * (dp[0][nt][e] - delta[nt * 8 + 2 * t + (e & 1)]);  // dS^T
      }
    GemmRegSmem<kD, 1, kBM>(dk, dp, sq_addr, lane);  // dK += dS^T Q
  }

  // K and V rows of this warp were read only by this warp (as the A operand): reuse them to stage
  // the bf16 results for 16-byte stores.
  __syncwarp();
  StoreAccToSmem<kD>(sk + warp_row * Tr::kPitch, dk[0], p.scale, p.scale, lane);
  StoreAccToSmem<kD>(sv + warp_row * Tr::kPitch, dv[0], 1.f, 1.f, lane);
  __syncwarp();
  bf16* dk_out = p.dk + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  bf16* dv_out = p.dv + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;
  StoreRowsFromSmem<16, kD>(dk_out, p.k_stride, warp_k0, seq, sk + warp_row * Tr::kPitch, lane);
  StoreRowsFromSmem<16, kD>(dv_out, p.v_stride, warp_k0, seq, sv + warp_row * Tr::kPitch, lane);
}

}  // namespace tandem::ops::cuda::attn
