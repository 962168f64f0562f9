// Attention backward, dQ: one block per (batch, query head, tile of kBM = 16 * kWarps query
// rows); each warp owns 16 rows. Q and dO of the tile stay in shared memory; the block walks the
// visible key tiles (kBN keys, K and V double-buffered with cp.async) and per tile recomputes
//   P = 2^(s * scale * log2(e) - lse2)        (lse2 = lse * log2(e), from the forward)
//   dP = dO V^T,  dS = P * (dP - delta)
//   dQ += dS K
// in registers; dQ * scale is written once as bf16. Each dQ element has exactly one writer and a
// fixed summation order: deterministic. Private to attention_backward.cu.
#pragma once

#include "ops/cuda/attention_common.cuh"

namespace tandem::ops::cuda::attn {

template <int kD, int kWarps, int kBN>
struct DqTraits {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBM = kWarps * 16;  // query rows per block
  static constexpr int kPitch = kD + kSmemPad;
  static constexpr int kQElems = kBM * kPitch;   // Q or dO tile
  static constexpr int kKVElems = kBN * kPitch;  // one K or V buffer
  // Q | dO | K[2] | V[2] | key segment ids [2][kBN]
  static constexpr size_t kSmemBytes =
      (2 * kQElems + 4 * kKVElems) * sizeof(bf16) + 2 * kBN * sizeof(int32_t);
};

// grid: x = b * Hq + h, y = query tiles (reversed: the tiles with the most keys start first).
template <int kD, int kWarps, int kBN>
__global__ void __launch_bounds__(kWarps * 32) AttentionBackwardDqKernel(const BwdParams p) {
  using Tr = DqTraits<kD, kWarps, kBN>;
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* sq = reinterpret_cast<bf16*>(smem);                            // [kBM][pitch]
  bf16* sdo = sq + Tr::kQElems;                                        // [kBM][pitch]
  bf16* sk = sdo + Tr::kQElems;                                        // [2][kBN][pitch]
  bf16* sv = sk + 2 * Tr::kKVElems;                                    // [2][kBN][pitch]
  int32_t* sseg = reinterpret_cast<int32_t*>(sv + 2 * Tr::kKVElems);  // [2][kBN]

  const int seq = p.seq;
  const QueryTile qt = QueryTileOfBlock(p.q_heads, p.group, Tr::kBM);
  const int bh = qt.bh, b = qt.b, h = qt.h, kvh = qt.kvh, q0 = qt.q0;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int warp_row = warp * 16;     // the warp's first row inside the tile
  const int warp_q0 = q0 + warp_row;  // ... and its query index

  const int64_t b_tokens = static_cast<int64_t>(b) * seq;
  const bf16* q = p.q + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD;
  const bf16* dout = p.dout + b_tokens * p.o_stride + static_cast<int64_t>(h) * kD;
  const bf16* k = p.k + b_tokens * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + b_tokens * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + b_tokens;

  auto load_kv = [&](int j, int buf) {  // key tile j into buffer buf, as in the forward
    LoadTileAsync<kBN, kD, Tr::kThreads>(sk + buf * Tr::kKVElems, k, p.k_stride, j * kBN, seq,
                                         tid);
    LoadTileAsync<kBN, kD, Tr::kThreads>(sv + buf * Tr::kKVElems, v, p.v_stride, j * kBN, seq,
                                         tid);
    CpAsyncCommit();
    if (seg != nullptr)
      StoreKeySegments(sseg + buf * kBN, seg, j * kBN, kBN, seq, tid, Tr::kThreads);
  };
  LoadTileAsync<Tr::kBM, kD, Tr::kThreads>(sq, q, p.q_stride, q0, seq, tid);
  LoadTileAsync<Tr::kBM, kD, Tr::kThreads>(sdo, dout, p.o_stride, q0, seq, tid);
  load_kv(0, 0);  // the first group holds Q, dO and key tile 0

  // The lane's rows warp_q0 + g + 8 * hf: log2-domain lse, delta and segment id.
  float lse2[2];
  float delta[2];
  int qseg[1][2];
  LoadRowStats(lse2, delta, qseg[0], p, bh, seg, warp_q0 + g, seq);

  float dq[1][kD / 8][4];
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[0][dt][e] = 0.f;

  const uint32_t sq_addr = SmemAddr(sq);
  const uint32_t sdo_addr = SmemAddr(sdo);
  const int num_ktiles = CeilDiv(p.causal ? min(q0 + Tr::kBM, seq) : seq, kBN);
  for (int j = 0; j < num_ktiles; ++j) {
    const int buf = j & 1;
    CpAsyncWaitAll();
    __syncthreads();  // tile j is visible to all; every warp is done with buffer buf ^ 1
    if (j + 1 < num_ktiles) load_kv(j + 1, buf ^ 1);
    const uint32_t sk_addr = SmemAddr(sk + buf * Tr::kKVElems);
    const uint32_t sv_addr = SmemAddr(sv + buf * Tr::kKVElems);

    float s[1][kBN / 8][4];
    GemmSmemNT<kD, 1, kBN>(s, sq_addr, warp_row, sk_addr, lane);  // S = Q K^T
    const int k0 = j * kBN;
    const bool need_mask =
        seg != nullptr || (p.causal ? k0 + kBN - 1 > q0 : k0 + kBN > seq);
    ScaleAndMaskRows<1, kBN>(s, p.scale_log2, need_mask, p.causal, warp_q0, k0, seq,
                             seg != nullptr ? sseg + buf * kBN : nullptr, qseg, lane);
    float dp[1][kBN / 8][4];
    GemmSmemNT<kD, 1, kBN>(dp, sdo_addr, warp_row, sv_addr, lane);  // dP = dO V^T
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = Exp2(s[0][nt][e] - lse2[e >> 1]);
        s[0][nt][e] = prob * (dp[0][nt][e] - delta[e >> 1]);  // dS
      }
    GemmRegSmem<kD, 1, kBN>(dq, s, sk_addr, lane);  // dQ += dS K
  }

  __syncwarp();  // the warp's ldmatrix reads of its Q rows are done before they are overwritten
  StoreAccToSmem<kD>(sq + warp_row * Tr::kPitch, dq[0], p.scale, p.scale, lane);
  __syncwarp();
  bf16* dq_out = p.dq + b_tokens * p.q_stride + static_cast<int64_t>(h) * kD;
  StoreRowsFromSmem<16, kD>(dq_out, p.q_stride, warp_q0, seq, sq + warp_row * Tr::kPitch, lane);
}

}  // namespace tandem::ops::cuda::attn
