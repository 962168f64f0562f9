// Fused causal grouped-query attention, forward, on Hopper's warpgroup tensor cores (wgmma),
// bf16, D in {64, 128}. Compiled for sm_90a only (CMakeLists.txt: tandem_ops_sm90a);
// attention_forward.cu calls it on devices of compute capability 9.0 and keeps the mma.sync
// kernel (attention_forward_kernel.cuh) for every other device and as the reference it is tested
// against.
//
// The scheme is the mma.sync kernel's (FlashAttention-2: one block per (batch, query head, tile of
// kBM query rows), online softmax in the log2 domain, the score tile never leaves registers), with
// the products on wgmma: each warpgroup owns 64 query rows; S = Q K^T reads Q and K from shared
// memory through descriptors (m64 n kBN k16, kD / 16 k-steps); O += P V takes P from registers (the
// S accumulator rounded to bf16, which is laid out as wgmma's A fragment) and V from shared memory
// read transposed (m64 n kD k16, kBN / 16 k-steps). K and V are double-buffered with cp.async into
// the swizzled tiles of wgmma.cuh.
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

template <int kD, int kGroups, int kBN>
struct FwdTraits {
  static constexpr int kThreads = kGroups * 128;
  static constexpr int kBM = kGroups * 64;            // query rows per block
  static constexpr uint32_t kQBytes = kBM * kD * 2;   // panelled Q tile
  static constexpr uint32_t kKVBytes = kBN * kD * 2;  // one K or V buffer
  static constexpr uint32_t kSegOffset = kQBytes + 4 * kKVBytes;
  // Q | K[2] | V[2] | key segment ids [2][kBN], plus 1 KiB to align the base to 1024 bytes.
  static constexpr size_t kSmemBytes = kSegOffset + 2 * kBN * sizeof(int32_t) + 1024;
};

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

// grid: x = b * Hq + h, y = query tiles (reversed: the tiles with the most keys start first).
template <int kD, int kGroups, int kBN, int kMinBlocks>
__global__ void __launch_bounds__(kGroups * 128, kMinBlocks)
    AttentionForwardSm90Kernel(const FwdParams p) {
  using Tr = FwdTraits<kD, kGroups, kBN>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Swizzled tiles must start on 1024-byte boundaries (wgmma.cuh).
  const uint32_t raw_addr = SmemAddr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char* smem = smem_raw + pad;
  const uint32_t sq = raw_addr + pad;
  const uint32_t sk = sq + Tr::kQBytes;                               // [2] buffers
  const uint32_t sv = sk + 2 * Tr::kKVBytes;                          // [2] buffers
  int32_t* sseg = reinterpret_cast<int32_t*>(smem + Tr::kSegOffset);  // [2][kBN]

  const int seq = p.seq;
  const QueryTile qt = QueryTileOfBlock(p.q_heads, p.group, Tr::kBM);
  const int bh = qt.bh, b = qt.b, h = qt.h, kvh = qt.kvh, q0 = qt.q0;
  const int tid = threadIdx.x;
  const int group = tid >> 7;       // warpgroup: query rows 64 * group .. + 63 of the tile
  const int warp = (tid >> 5) & 3;  // warp inside the group: 16 of those rows
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int warp_row = group * 64 + warp * 16;  // the warp's first row inside the tile
  const int warp_q0 = q0 + warp_row;

  const bf16* q = p.q + static_cast<int64_t>(b) * seq * p.q_stride + static_cast<int64_t>(h) * kD;
  const bf16* k = p.k + static_cast<int64_t>(b) * seq * p.k_stride + static_cast<int64_t>(kvh) * kD;
  const bf16* v = p.v + static_cast<int64_t>(b) * seq * p.v_stride + static_cast<int64_t>(kvh) * kD;
  const int32_t* seg = p.seg == nullptr ? nullptr : p.seg + static_cast<int64_t>(b) * seq;

  // Key segment ids of tile j into buffer j & 1.
  auto load_seg = [&](int j) {
    StoreKeySegments(sseg + (j & 1) * kBN, seg, j * kBN, kBN, seq, tid, Tr::kThreads);
  };

  LoadTileSwizzled<Tr::kBM, kD, Tr::kThreads>(sq, q, p.q_stride, q0, seq, tid);
  LoadTileSwizzled<kBN, kD, Tr::kThreads>(sk, k, p.k_stride, 0, seq, tid);
  CpAsyncCommit();  // the first group holds Q and K_0
  if (seg != nullptr) load_seg(0);

  int qseg[1][2] = {};
  if (seg != nullptr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = warp_q0 + g + 8 * hf;
      qseg[0][hf] = row < seq ? seg[row] : 0;
    }
  }

  float o[1][kD / 8][4];
  float m[1][2] = {{-INFINITY, -INFINITY}};
  float l[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][dt][e] = 0.f;

  const uint32_t q_tile = sq + static_cast<uint32_t>(group * 64 * 128);  // this group's rows
  const int num_ktiles = CeilDiv(p.causal ? min(q0 + Tr::kBM, seq) : seq, kBN);

  // S = Q K_j^T into s (issued, not waited for).
  float s[1][kBN / 8][4];
  auto issue_qk = [&](int j) {
    const uint32_t k_tile = sk + (j & 1) * Tr::kKVBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      WgmmaSS<kBN>(s[0], DescKMajor(q_tile, Tr::kBM, kk), DescKMajor(k_tile, kBN, kk), kk > 0);
    }
    WgmmaCommit();
  };
  // O += P V_j with P from registers (issued, not waited for).
  uint32_t pa[kBN / 16][4];
  auto issue_pv = [&](int j) {
    const uint32_t v_tile = sv + (j & 1) * Tr::kKVBytes;
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
      WgmmaRS<kD>(o[0], pa[kk], DescMnMajor(v_tile, kBN, kk), 1);
    WgmmaCommit();
  };
  // Scale, mask and the online softmax of key tile j (in s), the factor that rescales O in
  // alpha, and P packed into pa.
  float alpha[2];
  auto softmax = [&](int j) {
    const int k0 = j * kBN;
    const bool need_mask = seg != nullptr || (p.causal ? k0 + kBN - 1 > warp_q0 : k0 + kBN > seq);
    if (need_mask) {
      MaskRows<kBN>(s[0], p.causal, warp_q0, k0, seq,
                    seg != nullptr ? sseg + (j & 1) * kBN : nullptr, qseg[0], lane);
    }
    OnlineSoftmax<kBN>(s[0], p.scale_log2, m[0], l[0], alpha);
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) PackA(pa[kk], s[0][2 * kk], s[0][2 * kk + 1]);
  };
  auto rescale_o = [&] {
#pragma unroll
    for (int dt = 0; dt < kD / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][dt][e] *= alpha[e >> 1];
  };

  // Software pipeline inside the warpgroup: while the softmax of key tile j runs on the CUDA
  // cores, the tensor cores do P_{j-1} V_{j-1}. Loads run a step ahead: the top of step j waits
  // for K_j and V_{j-1} and starts K_{j+1} and V_j (buffers j & 1 hold K_j and V_j).
  for (int j = 0; j < num_ktiles; ++j) {
    CpAsyncWaitAll();
    FenceProxyAsync();  // this thread's copies are visible to wgmma ...
    __syncthreads();    // ... and everyone's are; every group is done with what is overwritten
    if (j + 1 < num_ktiles) {
      LoadTileSwizzled<kBN, kD, Tr::kThreads>(sk + ((j + 1) & 1) * Tr::kKVBytes, k, p.k_stride,
                                              (j + 1) * kBN, seq, tid);
      if (seg != nullptr) load_seg(j + 1);
    }
    LoadTileSwizzled<kBN, kD, Tr::kThreads>(sv + (j & 1) * Tr::kKVBytes, v, p.v_stride, j * kBN,
                                            seq, tid);
    CpAsyncCommit();

    issue_qk(j);
    if (j > 0) issue_pv(j - 1);
    if (j > 0) {
      WgmmaWait<1>();  // S_j is done, P_{j-1} V_{j-1} may still run
    } else {
      WgmmaWait<0>();
    }
    PinAccumulator<kBN / 8>(s[0]);
    softmax(j);
    WgmmaWait<0>();  // P_{j-1} V_{j-1} is done with o and pa
    PinAccumulator<kD / 8>(o[0]);
    rescale_o();
    pack_p();
  }
  // The last P V.
  CpAsyncWaitAll();
  FenceProxyAsync();
  __syncthreads();
  issue_pv(num_ktiles - 1);
  WgmmaWait<0>();
  PinAccumulator<kD / 8>(o[0]);

  // Epilogue: full row sums, lse, O / l through this group's rows of the Q tile (same swizzled
  // layout) to 16-byte stores.
  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float sum = l[0][hf];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[hf] = sum > 0.f ? 1.f / sum : 0.f;  // a row with no visible key gets out = 0
    const int row = warp_q0 + g + 8 * hf;
    if (t == 0 && row < seq) {
      p.lse[static_cast<int64_t>(bh) * seq + row] =
          sum > 0.f ? (m[0][hf] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  // The group's wgmmas (the only readers of its Q rows) have completed (WgmmaWait<0>).
  StoreAccSwizzled<kD>(smem, Tr::kBM, group * 64, o[0], inv[0], inv[1], warp, lane);
  __syncthreads();
  StoreTileSwizzled<Tr::kBM, kD, Tr::kThreads>(
      p.out + static_cast<int64_t>(b) * seq * p.o_stride + static_cast<int64_t>(h) * kD, p.o_stride,
      q0, seq, smem, tid);
}

template <int kD, int kGroups, int kBN, int kMinBlocks = 1>
cudaError_t Launch(cudaStream_t stream, const FwdParams& p, int64_t batch) {
  using Tr = FwdTraits<kD, kGroups, kBN>;
  const int64_t num_qtiles = CeilDiv(p.seq, Tr::kBM);
  if (num_qtiles > 65535 || batch * p.q_heads > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto* kernel = AttentionForwardSm90Kernel<kD, kGroups, kBN, kMinBlocks>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(Tr::kSmemBytes));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(num_qtiles));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace sm90

cudaError_t AttentionForwardSm90(cudaStream_t stream, const FwdParams& p, int64_t batch,
                                 int head_dim) {
  // Measured on an H100 (docs/benchmarks.md): D = 64 runs two 128-row blocks of 64-key steps
  // per SM (one block leaves the tensor cores idle while it waits or does the softmax);
  // D = 128 needs 255 registers a thread at 128 query rows x 128 keys, one block per SM.
  switch (head_dim) {
    case 64:
      return sm90::Launch<64, 2, 64, 2>(stream, p, batch);
    case 128:
      return sm90::Launch<128, 2, 128, 1>(stream, p, batch);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda::attn
