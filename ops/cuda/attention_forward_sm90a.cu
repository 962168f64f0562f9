// Fused causal grouped-query attention, forward, on Hopper (sm_90a): wgmma products, TMA
// loads, warp specialization. bf16, D in {64, 128}. Compiled for sm_90a only (CMakeLists.txt:
// tandem_ops_sm90a); attention_forward.cu calls it on devices of compute capability 9.0 and keeps
// the mma.sync kernel (attention_forward_kernel.cuh) for every other device and as the reference
// it is tested against.
//
// One block per (batch, query head, tile of kBM = 64 x kGroups query rows), launched longest tile
// first. The block is kGroups consumer warpgroups and one producer warpgroup:
//   - The producer (one warp; the other three only give their registers back through
//     setmaxnreg) loads Q once and K and V tile by tile with TMA into a ring of kStages buffers,
//     each a 128-byte-swizzled panelled tile of wgmma.cuh (the tensor map's SWIZZLE_128B is that
//     layout), and the key segment ids with plain stores. mbarriers guard the ring: K and V each
//     have a "full" barrier (the bytes have landed) and an "empty" one (every consumer warp is
//     done with the buffer), so a K buffer is refilled as soon as S = Q K^T has completed.
//   - Each consumer warpgroup owns 64 query rows and runs FlashAttention-2's online softmax in
//     the log2 domain with the score tile in registers, pipelined inside the warpgroup: while the
//     softmax of key tile j runs on the CUDA cores, the tensor cores do P_{j-1} V_{j-1}. S = Q K^T
//     reads Q and K through descriptors (m64 n kBN k16); O += P V takes P from registers (the S
//     accumulator rounded to bf16 is wgmma's A fragment) and V read transposed. No block-wide
//     barrier after the start.
//   - With kTurns the consumer warpgroups also take turns issuing their products (ping-pong), so
//     that one group's softmax overlaps another group's products.
// Measured on an H200 (docs/benchmarks.md): D = 64 runs three consumer groups (192 query rows) of
// 128-key tiles without turns, D = 128 two groups of 128-key tiles with turns.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_common.cuh"
#include "ops/cuda/attention_forward_kernel.cuh"
#include "ops/cuda/attention_sm90a.h"
#include "ops/cuda/wgmma.cuh"

namespace tandem::ops::cuda::attn {
namespace sm90 {
namespace {

// Masks one key tile of raw scores (s = q.k, not yet scaled): entries whose key is invisible
// become -inf (ScaleAndMaskRows' rule, without the scaling, which OnlineSoftmax fuses into exp2).
template <int kBN>
__device__ __forceinline__ void MaskRows(float (&s)[kBN / 8][4], bool causal, int q_row0, int k0,
                                         int seq, const int32_t* kseg, const int (&qseg)[2],
                                         int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kBN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = q_row0 + g + 8 * (e >> 1);
      const int col = nt * 8 + 2 * t + (e & 1);
      const int key = k0 + col;
      bool visible = (!causal || key <= row) && key < seq;
      if (kseg != nullptr) visible = visible && kseg[col] == qseg[e >> 1];
      if (!visible) s[nt][e] = -INFINITY;
    }
}

// The online softmax of one key tile of raw scores, in the log2 domain (x = s * scale_log2),
// without touching O, which a wgmma may still be accumulating: updates the running max m (of x)
// and the lane's partial row sums l, turns s into p = 2^(x - m) (one FFMA and one exp2 per
// score) and returns the factor alpha[hf] by which O's rows g (hf 0) and g + 8 (hf 1) must be
// scaled. The maxima and sums run over four independent partials (short dependency chains). A
// row that has seen no visible key keeps m = -inf and uses offset 0, so no inf - inf arises.
template <int kBN>
__device__ __forceinline__ void OnlineSoftmax(float (&s)[kBN / 8][4], float scale_log2,
                                              float (&m)[2], float (&l)[2], float (&alpha)[2]) {
  static_assert(kBN % 32 == 0, "four partials of kBN / 32 column pairs");
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float part[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) part[i] = fmaxf(s[i][2 * hf], s[i][2 * hf + 1]);
#pragma unroll
    for (int nt = 4; nt < kBN / 8; ++nt) {
      part[nt & 3] = fmaxf(part[nt & 3], fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
    }
    float mx = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3])) * scale_log2;
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = fmaxf(mx, m[hf]);
    const float offset = mx == -INFINITY ? 0.f : mx;
    alpha[hf] = Exp2(m[hf] - offset);  // 0 when the old max is -inf
    m[hf] = mx;
#pragma unroll
    for (int i = 0; i < 4; ++i) part[i] = 0.f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      const float p0 = Exp2(fmaf(s[nt][2 * hf], scale_log2, -offset));
      const float p1 = Exp2(fmaf(s[nt][2 * hf + 1], scale_log2, -offset));
      s[nt][2 * hf] = p0;
      s[nt][2 * hf + 1] = p1;
      part[nt & 3] += p0 + p1;
    }
    l[hf] = l[hf] * alpha[hf] + ((part[0] + part[1]) + (part[2] + part[3]));
  }
}

// The kernel's parameter block: the three tensor maps first (64-byte aligned), then the rest.
struct Params {
  CUtensorMap tq;  // box 64 columns x kBM rows of one (batch, head)
  CUtensorMap tk;  // box 64 columns x kBN rows
  CUtensorMap tv;
  FwdParams p;
};

template <int kD, int kGroups, int kBN, int kStages>
struct Traits {
  static constexpr int kConsumerThreads = kGroups * 128;
  static constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup
  static constexpr int kBM = kGroups * 64;
  static constexpr uint32_t kQBytes = kBM * kD * 2;
  static constexpr uint32_t kKVBytes = kBN * kD * 2;
  static constexpr uint32_t kKOffset = kQBytes;
  static constexpr uint32_t kVOffset = kKOffset + kStages * kKVBytes;
  static constexpr uint32_t kSegOffset = kVOffset + kStages * kKVBytes;   // [kStages][kBN]
  static constexpr uint32_t kBarOffset = kSegOffset + kStages * kBN * 4;  // 8-byte aligned
  static constexpr int kNumBars = 1 + 4 * kStages;  // q_full, k_full, v_full, k_empty, v_empty
  static constexpr size_t kSmemBytes = kBarOffset + kNumBars * 8 + 1024;
  // setmaxnreg budgets: the producer keeps the minimum, the consumers share the rest of what
  // the block (one an SM) holds at launch, in multiples of 8 a thread.
  static constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegsFit =
      (kLaunchRegs * kThreads - kProducerRegs * 128) / kConsumerThreads / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerRegsFit > 240 ? 240 : kConsumerRegsFit;
  static_assert(kStages >= 2, "the pipeline needs two buffers of K and of V");
};

// grid: x = b * Hq + h, y = query tiles (reversed: the tiles with the most keys start first).
template <int kD, int kGroups, int kBN, int kStages, bool kTurns>
__global__ void __launch_bounds__(kGroups * 128 + 128, 1)
    AttentionForwardSm90Kernel(const __grid_constant__ Params args) {
  using Tr = Traits<kD, kGroups, kBN, kStages>;
  const FwdParams& p = args.p;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char* smem = smem_raw + pad;
  const uint32_t sq = raw_addr + pad;
  const uint32_t sk = sq + Tr::kKOffset;
  const uint32_t sv = sq + Tr::kVOffset;
  int32_t* sseg = reinterpret_cast<int32_t*>(smem + Tr::kSegOffset);
  const uint32_t bars = sq + Tr::kBarOffset;
  const uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + kStages + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * kStages + s); };

  const int seq = p.seq;
  const QueryTile qt = QueryTileOfBlock(p.q_heads, p.group, Tr::kBM);
  const int bh = qt.bh, b = qt.b, h = qt.h, kvh = qt.kvh, q0 = qt.q0;
  const int tid = threadIdx.x;
  const int group = tid >> 7;  // kGroups: the producer
  const int warp = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int num_ktiles = CeilDiv(p.causal ? min(q0 + Tr::kBM, seq) : seq, kBN);
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + static_cast<int64_t>(b) * seq;

  if (tid == 0) {
    MbarInit(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      MbarInit(k_full(s), 1);
      MbarInit(v_full(s), 1);
      MbarInit(k_empty(s), kGroups * 4);  // one arrival per consumer warp
      MbarInit(v_empty(s), kGroups * 4);
    }
    MbarInitFence();
  }
  __syncthreads();  // the last block-wide barrier

  if (group == kGroups) {
    // Producer. Warp 0 loads (lane 0 issues the copies, all lanes write the key segment ids);
    // the other three warps only give their registers back.
    SetMaxRegsDec<Tr::kProducerRegs>();
    if (warp != 0) return;
    if (lane == 0) {
      MbarArriveExpectTx(q_full, Tr::kQBytes);
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        TmaLoad4d(sq + c * Tr::kBM * 128, &args.tq, c * 64, h, q0, b, q_full);
      }
    }
    // Key tile j of K or V (its map) into buffer `tile`, completing on `full`.
    auto load_kv = [&](uint32_t tile, const CUtensorMap* map, int j, uint32_t full) {
      if (lane != 0) return;
      MbarArriveExpectTx(full, Tr::kKVBytes);
#pragma unroll
      for (int c = 0; c < kD / 64; ++c) {
        TmaLoad4d(tile + c * kBN * 128, map, c * 64, kvh, j * kBN, b, full);
      }
    };
    for (int j = 0; j < num_ktiles; ++j) {
      const int s = j % kStages;
      const uint32_t fill = j / kStages;
      if (j >= kStages) MbarWait(k_empty(s), (fill - 1) & 1);
      if (seg != nullptr) {
        StoreKeySegments(sseg + s * kBN, seg, j * kBN, kBN, seq, lane, 32);
        __syncwarp();
      }
      load_kv(sk + s * Tr::kKVBytes, &args.tk, j, k_full(s));
      if (j >= kStages) MbarWait(v_empty(s), (fill - 1) & 1);
      load_kv(sv + s * Tr::kKVBytes, &args.tv, j, v_full(s));
    }
    return;
  }

  // Consumers: warpgroup `group` owns query rows 64 * group .. + 63 of the tile.
  SetMaxRegsInc<Tr::kConsumerRegs>();
  const int g = lane >> 2;
  const int t = lane & 3;
  const int warp_row = group * 64 + warp * 16;
  const int warp_q0 = q0 + warp_row;

  int qseg[2] = {};
  if (seg != nullptr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_q0 + g + 8 * hf;
      qseg[hf] = row < seq ? seg[row] : 0;
    }
  }
  float o[kD / 8][4];
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;

  const uint32_t q_tile = sq + static_cast<uint32_t>(group * 64 * 128);
  float s[kBN / 8][4];
  auto issue_qk = [&](int j) {
    const uint32_t k_tile = sk + (j % kStages) * Tr::kKVBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      WgmmaSS<kBN>(s, DescKMajor(q_tile, Tr::kBM, kk), DescKMajor(k_tile, kBN, kk), kk > 0);
    }
    WgmmaCommit();
  };
  uint32_t pa[kBN / 16][4];
  auto issue_pv = [&](int j) {
    const uint32_t v_tile = sv + (j % kStages) * Tr::kKVBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) WgmmaRS<kD>(o, pa[kk], DescMnMajor(v_tile, kBN, kk), 1);
    WgmmaCommit();
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) MbarArrive(bar);
  };

  // Turns (kTurns): the groups take turns issuing their products, so that one group's softmax
  // runs while another's products occupy the tensor cores. Group g waits at barrier kTurn + g
  // for its turn and hands it to the next group once its S has completed (a hand-over between
  // the issue and the wait makes ptxas serialize the wgmmas); the last group starts by handing
  // it to group 0, and group 0 takes one turn more at the end, so every barrier balances.
  constexpr int kTurn = 1 + kGroups;  // after the epilogue barriers 1 .. kGroups
  const int next_group = group + 1 == kGroups ? 0 : group + 1;
  if (kTurns && group == kGroups - 1) NamedBarrierArrive(kTurn, 256);
  MbarWait(q_full, 0);
  float alpha[2];
  for (int j = 0; j < num_ktiles; ++j) {
    const int st = j % kStages;
    const uint32_t parity = (j / kStages) & 1;
    MbarWait(k_full(st), parity);
    if (j > 0) MbarWait(v_full((j - 1) % kStages), ((j - 1) / kStages) & 1);
    if (kTurns) NamedBarrierSync(kTurn + group, 256);
    issue_qk(j);
    if (j > 0) issue_pv(j - 1);
    if (j > 0) {
      WgmmaWait<1>();  // S_j is done, P_{j-1} V_{j-1} may still run
    } else {
      WgmmaWait<0>();
    }
    if (kTurns) NamedBarrierArrive(kTurn + next_group, 256);
    if (seg == nullptr) release(k_empty(st));  // else the masking still reads its segment ids
    PinAccumulator<kBN / 8>(s);
    const int k0 = j * kBN;
    const bool need_mask = seg != nullptr || (p.causal ? k0 + kBN - 1 > warp_q0 : k0 + kBN > seq);
    if (need_mask) {
      MaskRows<kBN>(s, p.causal, warp_q0, k0, seq, seg != nullptr ? sseg + st * kBN : nullptr, qseg,
                    lane);
    }
    if (seg != nullptr) release(k_empty(st));
    OnlineSoftmax<kBN>(s, p.scale_log2, m, l, alpha);
    WgmmaWait<0>();  // P_{j-1} V_{j-1} is done with o, pa and V_{j-1}
    if (j > 0) release(v_empty((j - 1) % kStages));
    PinAccumulator<kD / 8>(o);
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) PackA(pa[kk], s[2 * kk], s[2 * kk + 1]);
  }
  if (kTurns && group == 0) NamedBarrierSync(kTurn, 256);
  {
    const int j = num_ktiles - 1;
    MbarWait(v_full(j % kStages), (j / kStages) & 1);
    issue_pv(j);
    WgmmaWait<0>();
    PinAccumulator<kD / 8>(o);
  }

  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float sum = l[hf];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[hf] = sum > 0.f ? 1.f / sum : 0.f;
    const int row = warp_q0 + g + 8 * hf;
    if (t == 0 && row < seq) {
      p.lse[static_cast<int64_t>(bh) * seq + row] =
          sum > 0.f ? (m[hf] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  // This group's Q rows are read by its own wgmmas only, all completed: O goes through them.
  StoreAccSwizzled<kD>(smem, Tr::kBM, group * 64, o, inv[0], inv[1], warp, lane);
  NamedBarrierSync(1 + group, 128);
  bf16* out = p.out + static_cast<int64_t>(b) * seq * p.o_stride + static_cast<int64_t>(h) * kD;
  constexpr int kChunksPerRow = kD / 8;
  const int gt = tid & 127;
#pragma unroll
  for (int i = 0; i < 64 * kChunksPerRow / 128; ++i) {
    const int c = gt + i * 128;
    const int r = group * 64 + c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    if (q0 + r < seq) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(q0 + r) * p.o_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + SwizzledChunk(Tr::kBM, r, chunk));
    }
  }
}

template <int kD, int kGroups, int kBN, int kStages, bool kTurns>
cudaError_t Launch(cudaStream_t stream, const FwdParams& p, int64_t batch) {
  using Tr = Traits<kD, kGroups, kBN, kStages>;
  const int64_t num_qtiles = CeilDiv(p.seq, Tr::kBM);
  if (num_qtiles > 65535 || batch * p.q_heads > 0x7fffffff) return cudaErrorInvalidConfiguration;
  Params args{};
  args.p = p;
  const int kv_heads = p.q_heads / p.group;
  cudaError_t err =
      EncodeOperandMap(&args.tq, p.q, kD, p.q_heads, p.q_stride, p.seq, batch, Tr::kBM);
  if (err == cudaSuccess) {
    err = EncodeOperandMap(&args.tk, p.k, kD, kv_heads, p.k_stride, p.seq, batch, kBN);
  }
  if (err == cudaSuccess) {
    err = EncodeOperandMap(&args.tv, p.v, kD, kv_heads, p.v_stride, p.seq, batch, kBN);
  }
  if (err != cudaSuccess) return err;
  auto* kernel = AttentionForwardSm90Kernel<kD, kGroups, kBN, kStages, kTurns>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(Tr::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(num_qtiles));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sm90

cudaError_t AttentionForwardSm90(cudaStream_t stream, const FwdParams& p, int64_t batch,
                                 int head_dim) {
  switch (head_dim) {
    case 64:
      return sm90::Launch<64, 3, 128, 2, false>(stream, p, batch);
    case 128:
      return sm90::Launch<128, 2, 128, 2, true>(stream, p, batch);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda::attn
