// Building blocks of the fused attention kernels (attention_forward_kernel.cuh,
// attention_backward_*.cuh): the operand-fragment loaders with their lane <-> element mappings
// written out, the predicated tile loads and stores, the two warp-level products every attention
// matmul is made of, the causal/segment mask, and the backward's parameter block. The raw PTX they
// stand on is in attention_ptx.cuh.
//
// Private to ops/cuda; only the attention kernels include it. Everything is a device function.
//
// Shared-memory tiles are row-major bf16 [rows][D + kSmemPad]. The 8-element (16-byte) pad makes
// the 8 row addresses of every ldmatrix 8x8 matrix fall into 8 different 16-byte bank groups
// (row pitch 2D + 16 bytes = 16 mod 128 for D in {64, 128}), so ldmatrix and the 4-byte stores of
// the epilogues are free of bank conflicts without an XOR swizzle.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_ptx.cuh"

namespace tandem::ops::cuda::attn {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr int kSmemPad = 8;  // elements added to each shared-memory row

__host__ __device__ constexpr int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// The query tile of a block of the kernels launched with grid x = b * Hq + h, y = query tiles
// of `rows` rows taken in reverse (the tiles with the most keys start first).
struct QueryTile {
  int bh, b, h, kvh;  // bh = b * Hq + h; kvh = h / group
  int q0;             // the tile's first query
};
__device__ __forceinline__ QueryTile QueryTileOfBlock(int q_heads, int group, int rows) {
  QueryTile t;
  t.bh = static_cast<int>(blockIdx.x);
  t.b = t.bh / q_heads;
  t.h = t.bh % q_heads;
  t.kvh = t.h / group;
  t.q0 = static_cast<int>(gridDim.y - 1 - blockIdx.y) * rows;
  return t;
}

// A fragment (16 x 16) from the C fragments of the two 16x8 tiles covering its 16 columns (see the
// fragment table in attention_ptx.cuh).
__device__ __forceinline__ void PackA(uint32_t (&a)[4], const float (&c_lo)[4],
                                      const float (&c_hi)[4]) {
  a[0] = PackBf16x2(c_lo[0], c_lo[1]);
  a[1] = PackBf16x2(c_lo[2], c_lo[3]);
  a[2] = PackBf16x2(c_hi[0], c_hi[1]);
  a[3] = PackBf16x2(c_hi[2], c_hi[3]);
}

// Fragment loaders. `base` is the shared address of element [0][0] of a row-major bf16 matrix M
// with row pitch `pitch` elements; all offsets are multiples of 8 elements (16-byte aligned).

// A fragment of the 16x16 block M[r0 .. r0+15][c0 .. c0+15] (A = M, "row" operand).
// Lane l points at row r0 + (l & 15), column c0 + (l >> 4) * 8:
//   lanes  0- 7: rows 0-7,  cols 0-7  -> matrix 0 -> a0 = A[g][2t..]
//   lanes  8-15: rows 8-15, cols 0-7  -> matrix 1 -> a1 = A[g+8][2t..]
//   lanes 16-23: rows 0-7,  cols 8-15 -> matrix 2 -> a2 = A[g][2t+8..]
//   lanes 24-31: rows 8-15, cols 8-15 -> matrix 3 -> a3 = A[g+8][2t+8..]
__device__ __forceinline__ void LoadFragA(uint32_t (&a)[4], uint32_t base, int pitch, int r0,
                                          int c0, int lane) {
  const int row = r0 + (lane & 15);
  const int col = c0 + (lane >> 4) * 8;
  Ldsm4(a, base + static_cast<uint32_t>(row * pitch + col) * 2u);
}

// B fragments for B[k][n] = M[n][k] (M stored n-major, e.g. K in Q.K^T): the two 16x8 tiles
// n = n0..n0+7 (b[0], b[1]) and n = n0+8..n0+15 (b[2], b[3]), k = k0..k0+15.
// b0 = B[2t..][g] = M[n0 + g][k0 + 2t..] is a plain 8x8 load of rows n, cols k.
// Lane l points at row n0 + (l & 7) + (l >> 4) * 8, column k0 + ((l >> 3) & 1) * 8:
//   lanes  0- 7: n 0-7,  k 0-7  -> b[0] = b0 of tile n0
//   lanes  8-15: n 0-7,  k 8-15 -> b[1] = b1 of tile n0
//   lanes 16-23: n 8-15, k 0-7  -> b[2] = b0 of tile n0+8
//   lanes 24-31: n 8-15, k 8-15 -> b[3] = b1 of tile n0+8
__device__ __forceinline__ void LoadFragBnk(uint32_t (&b)[4], uint32_t base, int pitch, int n0,
                                            int k0, int lane) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int col = k0 + ((lane >> 3) & 1) * 8;
  Ldsm4(b, base + static_cast<uint32_t>(row * pitch + col) * 2u);
}

// B fragments for B[k][n] = M[k][n] (M stored k-major, e.g. V in P.V): the two 16x8 tiles
// n = n0..n0+7 (b[0], b[1]) and n = n0+8..n0+15 (b[2], b[3]), k = k0..k0+15.
// b0 = (B[2t][g], B[2t+1][g]) = (M[k0+2t][n0+g], M[k0+2t+1][n0+g]) is a .trans 8x8 load of
// rows k, cols n. Lane l points at row k0 + (l & 7) + ((l >> 3) & 1) * 8, column n0 + (l >> 4) * 8:
//   lanes  0- 7: k 0-7,  n 0-7  -> b[0] = b0 of tile n0
//   lanes  8-15: k 8-15, n 0-7  -> b[1] = b1 of tile n0
//   lanes 16-23: k 0-7,  n 8-15 -> b[2] = b0 of tile n0+8
//   lanes 24-31: k 8-15, n 8-15 -> b[3] = b1 of tile n0+8
__device__ __forceinline__ void LoadFragBkn(uint32_t (&b)[4], uint32_t base, int pitch, int k0,
                                            int n0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = n0 + (lane >> 4) * 8;
  Ldsm4Trans(b, base + static_cast<uint32_t>(row * pitch + col) * 2u);
}

// Starts the copy of rows row0 .. row0 + kRows - 1 of a [T, D] operand (row r at
// gmem + r * row_stride, D contiguous) into smem [kRows][kD + kSmemPad]. Rows >= num_rows are
// zero-filled (so 0 * garbage can never make a NaN). All kThreads threads of the block call it.
template <int kRows, int kD, int kThreads>
__device__ __forceinline__ void LoadTileAsync(bf16* smem, const bf16* gmem, int64_t row_stride,
                                              int row0, int num_rows, int tid) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must divide evenly among the threads");
  const uint32_t base = SmemAddr(smem);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const int row = row0 + r;
    const bool valid = row < num_rows;
    const bf16* src = valid ? gmem + row * row_stride + col : gmem;
    CpAsync16(base + static_cast<uint32_t>(r * (kD + kSmemPad) + col) * 2u, src, valid);
  }
}

// Copies rows [0, kRows) of a shared tile [kRows][kD + kSmemPad] to global rows row0 + r that
// are < num_rows, 16 bytes per store. Called by one warp for its own rows.
template <int kRows, int kD>
__device__ __forceinline__ void StoreRowsFromSmem(bf16* gmem, int64_t row_stride, int row0,
                                                  int num_rows, const bf16* smem, int lane) {
  constexpr int kChunksPerRow = kD / 8;
  static_assert((kRows * kChunksPerRow) % 32 == 0, "rows must divide evenly among the lanes");
#pragma unroll
  for (int i = 0; i < kRows * kChunksPerRow / 32; ++i) {
    const int c = lane + 32 * i;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    if (row0 + r < num_rows) {
      *reinterpret_cast<uint4*>(gmem + (row0 + r) * row_stride + col) =
          *reinterpret_cast<const uint4*>(smem + r * (kD + kSmemPad) + col);
    }
  }
}

// Writes a warp's 16 x kD f32 accumulator tile (C fragments acc[n-tile][4], columns
// 8 * nt + 2t, +1 of rows g and g + 8) times `mul` as bf16 into smem rows [16][kD + kSmemPad].
template <int kD>
__device__ __forceinline__ void StoreAccToSmem(bf16* smem, const float (&acc)[kD / 8][4],
                                               float mul_lo, float mul_hi, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kD / 8; ++nt) {
    const int col = nt * 8 + 2 * t;
    *reinterpret_cast<uint32_t*>(smem + g * (kD + kSmemPad) + col) =
        PackBf16x2(acc[nt][0] * mul_lo, acc[nt][1] * mul_lo);
    *reinterpret_cast<uint32_t*>(smem + (g + 8) * (kD + kSmemPad) + col) =
        PackBf16x2(acc[nt][2] * mul_hi, acc[nt][3] * mul_hi);
  }
}

// ---------------------------------------------------------------------------------------------
// The two warp-level products every attention matmul is made of. A warp owns kMT x 16 rows of
// its result; kN (or kK) counts columns of the other operand; tiles are [rows][kD + kSmemPad].
// ---------------------------------------------------------------------------------------------

// c[mt][nt] = A[a_row0 + mt*16 + (0..15)] . B[nt*8 + (0..7)]^T over kD, both operands row-major
// in shared memory (rows of length kD). Used for S = Q K^T, dP = dO V^T and their transposes
// S^T = K Q^T, dP^T = V dO^T.
template <int kD, int kMT, int kN>
__device__ __forceinline__ void GemmSmemNT(float (&c)[kMT][kN / 8][4], uint32_t sa, int a_row0,
                                           uint32_t sb, int lane) {
  constexpr int kPitch = kD + kSmemPad;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[mt][nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) LoadFragA(a[mt], sa, kPitch, a_row0 + mt * 16, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < kN / 16; ++np) {
      uint32_t b[4];
      LoadFragBnk(b, sb, kPitch, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Mma16816(c[mt][2 * np], a[mt], b[0], b[1]);
        Mma16816(c[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[mt] += P[mt] . B: P is f32 in registers as C fragments (rows of the warp x kK columns),
// rounded to bf16 here; B is [kK][kD] row-major in shared memory. Used for O += P V,
// dQ += dS K, dV += P^T dO and dK += dS^T Q.
template <int kD, int kMT, int kK>
__device__ __forceinline__ void GemmRegSmem(float (&acc)[kMT][kD / 8][4],
                                            const float (&p)[kMT][kK / 8][4], uint32_t sb,
                                            int lane) {
  constexpr int kPitch = kD + kSmemPad;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) PackA(a[mt], p[mt][2 * kk], p[mt][2 * kk + 1]);
#pragma unroll
    for (int dp = 0; dp < kD / 16; ++dp) {
      uint32_t b[4];
      LoadFragBkn(b, sb, kPitch, kk * 16, dp * 16, lane);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        Mma16816(acc[mt][2 * dp], a[mt], b[0], b[1]);
        Mma16816(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Scores with queries as rows (forward, dQ): scales them into the log2 domain
// (x = s * scale * log2(e)); with need_mask, entries whose key is invisible become -inf.
// s[mt][nt][e] is query q_row0 + mt*16 + g + 8*(e/2), key k0 + nt*8 + 2t + e%2.
// kseg: the key tile's segment ids in shared memory, or nullptr without segments; qseg: the
// segment ids of the lane's rows. Key j is visible to query i iff j < seq, j <= i when causal
// (a block with every key visible otherwise, ops::AttentionMask::kFull), and the segments agree.
template <int kMT, int kBN>
__device__ __forceinline__ void ScaleAndMaskRows(float (&s)[kMT][kBN / 8][4], float scale_log2,
                                                 bool need_mask, bool causal, int q_row0, int k0,
                                                 int seq, const int32_t* kseg,
                                                 const int (&qseg)[kMT][2],
                                                 int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[mt][nt][e] * scale_log2;
        if (need_mask) {
          const int row = q_row0 + mt * 16 + g + 8 * (e >> 1);
          const int col = nt * 8 + 2 * t + (e & 1);  // inside the key tile
          const int key = k0 + col;
          bool visible = (!causal || key <= row) && key < seq;
          if (kseg != nullptr) visible = visible && kseg[col] == qseg[mt][e >> 1];
          if (!visible) x = -INFINITY;
        }
        s[mt][nt][e] = x;
      }
}

// Arguments of the backward kernels (attention_backward*.cuh). Pointers are to element [0] of
// each operand; head h of token i of batch b is at base + (b * seq + i) * stride + h * D.
struct BwdParams {
  bf16* dq;            // [B, T, Hq, D], token stride q_stride
  bf16* dk;            // [B, T, Hkv, D], token stride k_stride
  bf16* dv;            // [B, T, Hkv, D], token stride v_stride
  const bf16* dout;    // [B, T, Hq, D], token stride o_stride
  const bf16* q;       // [B, T, Hq, D], token stride q_stride
  const bf16* k;       // [B, T, Hkv, D], token stride k_stride
  const bf16* v;       // [B, T, Hkv, D], token stride v_stride
  const float* lse;    // [B, Hq, T], natural log
  const float* delta;  // [B, Hq, T], sum_d dout * out
  const int32_t* seg;  // [B, T] or nullptr
  int64_t q_stride, k_stride, v_stride, o_stride;
  int seq, q_heads, kv_heads, group;  // group = Hq / Hkv
  bool causal;                        // false: every key visible (a full block of a ring)
  float scale;                        // softmax scale (dq and dk carry it once)
  float scale_log2;                   // scale * log2(e)
  // Fused dQ (the sm_90a dK/dV kernel; all nullptr otherwise): f32 partial sums in 64-row tiles,
  // dq_tiles a (batch, head) (DqAccIndex in attention_backward_sm90a.cu), per tile the number of
  // key tiles already added, and the counter that hands out the blocks' tiles in order. Zeroed
  // counters on entry.
  float* dq_acc;
  int32_t* dq_sem;
  int32_t* dq_ticket;
  int dq_tiles;
};

// lse in the log2 domain for P = 2^(x - lse2); rows without a visible key (lse = -inf) and rows
// beyond the sequence get +inf, which makes their P exactly 0 instead of inf or NaN.
__device__ __forceinline__ float Lse2ForBackward(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// Segment ids of keys k0 .. k0 + count - 1 into shared memory (-1 past the sequence: such keys
// are masked anyway), by plain stores that the next __syncthreads() publishes. All threads call it.
__device__ __forceinline__ void StoreKeySegments(int32_t* dst, const int32_t* seg, int k0,
                                                 int count, int seq, int tid, int threads) {
  for (int i = tid; i < count; i += threads) {
    const int key = k0 + i;
    dst[i] = key < seq ? seg[key] : -1;
  }
}

// The per-query statistics of queries qs .. qs + count - 1 of one (batch, head) (stats: the
// offset of its [b, h, 0] entry in lse and delta) into shared memory: lse in the log2 domain,
// delta and the segment id (seg nullptr: none); queries past the sequence get +inf, 0 and -1,
// which zero their P. Plain stores, published by the next __syncthreads(). All threads call it.
__device__ __forceinline__ void StoreQueryStats(float* lse2, float* delta, int32_t* qseg,
                                                const BwdParams& p, int64_t stats,
                                                const int32_t* seg, int qs, int count, int seq,
                                                int tid, int threads) {
  for (int i = tid; i < count; i += threads) {
    const int row = qs + i;
    const bool valid = row < seq;
    lse2[i] = valid ? Lse2ForBackward(p.lse[stats + row]) : INFINITY;
    delta[i] = valid ? p.delta[stats + row] : 0.f;
    if (seg != nullptr) qseg[i] = valid ? seg[row] : -1;
  }
}

// The statistics of a lane's two query rows, row0 and row0 + 8, of (batch, head) bh, in
// registers: rows past the sequence get lse2 = +inf (P = 0), delta 0 and segment 0.
__device__ __forceinline__ void LoadRowStats(float (&lse2)[2], float (&delta)[2], int (&qseg)[2],
                                             const BwdParams& p, int bh, const int32_t* seg,
                                             int row0, int seq) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int row = row0 + 8 * hf;
    lse2[hf] = INFINITY;
    delta[hf] = 0.f;
    qseg[hf] = 0;
    if (row < seq) {
      lse2[hf] = Lse2ForBackward(p.lse[static_cast<int64_t>(bh) * seq + row]);
      delta[hf] = p.delta[static_cast<int64_t>(bh) * seq + row];
      if (seg != nullptr) qseg[hf] = seg[row];
    }
  }
}

}  // namespace tandem::ops::cuda::attn
