// Fused causal grouped-query attention, backward (FlashAttention-2 scheme without atomics), bf16,
// D in {64, 128}. Three kernels on the caller's stream (on compute capability 9.0, 2 and 3 are
// the wgmma kernels of attention_backward_sm90a.cu, same scheme):
//   1. delta[b, h, i] = sum_d dout * out (f32, in the caller's scratch);
//   2. dK, dV: one block per (batch, kv head, key tile), attention_backward_dkdv.cuh;
//   3. dQ: one block per (batch, query head, query tile), attention_backward_dq.cuh.
// Every output element is written by exactly one thread after a reduction in a fixed order, so
// results are bitwise reproducible; dq, dk and dv are overwritten (never read). On compute
// capability 9.0 with fused dQ (the default) kernel 3 is gone: the dK/dV kernel adds each key
// tile's dS K into f32 partial sums in key-tile order (attention_backward_sm90a.cu).
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/attention_backward_delta.cuh"
#include "ops/cuda/attention_backward_dkdv.cuh"
#include "ops/cuda/attention_backward_dq.cuh"
#include "ops/cuda/attention_common.cuh"
#include "ops/cuda/attention_sm90a.h"
#include "ops/internal/cuda_kernels.h"

namespace tandem::ops::cuda {
namespace attn {
namespace {

// The three kernels for one head dim; the launch configurations are chosen in AttentionBackward.
template <int kD, int kDkdvWarps, int kDkdvBM, int kDqWarps, int kDqBN>
cudaError_t LaunchBackward(cudaStream_t stream, const BwdParams& p, const bf16* out, float* delta,
                           int64_t batch, bool sm90, size_t sem_bytes) {
  using DkdvTr = DkdvTraits<kD, kDkdvWarps, kDkdvBM>;
  using DqTr = DqTraits<kD, kDqWarps, kDqBN>;
  const int64_t rows = batch * p.seq * p.q_heads;
  const int64_t delta_blocks = (rows + kDeltaRowsPerBlock - 1) / kDeltaRowsPerBlock;
  const int64_t key_tiles = CeilDiv(p.seq, DkdvTr::kBN);
  const int64_t query_tiles = CeilDiv(p.seq, DqTr::kBM);
  if (delta_blocks > 0x7fffffff || batch * p.q_heads > 0x7fffffff || key_tiles > 65535 ||
      query_tiles > 65535) {
    return cudaErrorInvalidConfiguration;
  }

  auto* dkdv_kernel = AttentionBackwardDkdvKernel<kD, kDkdvWarps, kDkdvBM>;
  auto* dq_kernel = AttentionBackwardDqKernel<kD, kDqWarps, kDqBN>;
  cudaError_t err = cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(DkdvTr::kSmemBytes));
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(DqTr::kSmemBytes));
  if (err != cudaSuccess) return err;

  AttentionDeltaKernel<kD><<<static_cast<unsigned>(delta_blocks), kDeltaRowsPerBlock * 32, 0,
                             stream>>>(delta, out, p.dout, p.o_stride, p.seq, p.q_heads, rows);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (sm90) return AttentionBackwardSm90(stream, p, batch, kD, sem_bytes);
  const dim3 dkdv_grid(static_cast<unsigned>(batch * p.kv_heads), static_cast<unsigned>(key_tiles));
  dkdv_kernel<<<dkdv_grid, DkdvTr::kThreads, DkdvTr::kSmemBytes, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 dq_grid(static_cast<unsigned>(batch * p.q_heads), static_cast<unsigned>(query_tiles));
  dq_kernel<<<dq_grid, DqTr::kThreads, DqTr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace attn

namespace {

size_t Align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The scratch of one backward: delta [B, Hq, T] f32; with fused dQ also the ordering counters
// (dq_tiles per (batch, head), then the block ticket) and the f32 partial sums (64-row tiles).
struct BackwardScratch {
  size_t delta_bytes = 0, sem_bytes = 0, acc_bytes = 0;
  int dq_tiles = 0;
  size_t total() const { return delta_bytes + sem_bytes + acc_bytes; }
};

BackwardScratch ScratchOf(const AttentionShape& s) {
  BackwardScratch b;
  const size_t bh = static_cast<size_t>(s.batch) * static_cast<size_t>(s.q_heads);
  const size_t seq = static_cast<size_t>(s.seq);
  b.delta_bytes = Align256(bh * seq * sizeof(float));
  // Fused dQ: the wgmma kernels (attention_backward_sm90a.cu).
  const bool fused = s.allow_sm90 && s.fused_dq && (s.head_dim == 64 || s.head_dim == 128) &&
                     attn::DeviceRunsSm90a();
  if (fused) {
    // 64-query tiles of the 128-row steps: at most ceil(T / 64) + 1 a head.
    b.dq_tiles = static_cast<int>((s.seq + 63) / 64 + 1);
    b.sem_bytes = Align256((bh * static_cast<size_t>(b.dq_tiles) + 1) * sizeof(int32_t));
    b.acc_bytes = Align256(bh * static_cast<size_t>(b.dq_tiles) * 64 *
                           static_cast<size_t>(s.head_dim) * sizeof(float));
  }
  return b;
}

}  // namespace

size_t AttentionBackwardScratchBytes(const AttentionShape& s) { return ScratchOf(s).total(); }

cudaError_t AttentionBackward(cudaStream_t stream, const AttentionShape& s, void* dq, void* dk,
                              void* dv, const void* dout, const void* q, const void* k,
                              const void* v, const void* out, const float* lse, float scale,
                              const int32_t* segment_ids, void* scratch, size_t scratch_bytes) {
  if (s.batch == 0 || s.seq == 0 || s.q_heads == 0) return cudaSuccess;
  if (s.kv_heads <= 0 || s.q_heads % s.kv_heads != 0 || s.seq > 0x7fffffff ||
      scratch == nullptr || scratch_bytes < AttentionBackwardScratchBytes(s)) {
    return cudaErrorInvalidValue;
  }
  const BackwardScratch layout = ScratchOf(s);
  float* delta = static_cast<float*>(scratch);
  attn::BwdParams p{};
  // Fused dQ writes dq in 16-byte stores.
  if (layout.acc_bytes > 0 && s.q_stride % 8 == 0 && reinterpret_cast<uintptr_t>(dq) % 16 == 0) {
    unsigned char* base = static_cast<unsigned char*>(scratch) + layout.delta_bytes;
    p.dq_sem = reinterpret_cast<int32_t*>(base);
    p.dq_ticket = p.dq_sem + static_cast<int64_t>(s.batch) * s.q_heads * layout.dq_tiles;
    p.dq_acc = reinterpret_cast<float*>(base + layout.sem_bytes);
    p.dq_tiles = layout.dq_tiles;
  }
  p.dq = static_cast<attn::bf16*>(dq);
  p.dk = static_cast<attn::bf16*>(dk);
  p.dv = static_cast<attn::bf16*>(dv);
  p.dout = static_cast<const attn::bf16*>(dout);
  p.q = static_cast<const attn::bf16*>(q);
  p.k = static_cast<const attn::bf16*>(k);
  p.v = static_cast<const attn::bf16*>(v);
  p.lse = lse;
  p.delta = delta;
  p.seg = segment_ids;
  p.q_stride = s.q_stride;
  p.k_stride = s.k_stride;
  p.v_stride = s.v_stride;
  p.o_stride = s.o_stride;  // out and dout share the [B, T, Hq, D] layout and token stride
  p.seq = static_cast<int>(s.seq);
  p.q_heads = static_cast<int>(s.q_heads);
  p.kv_heads = static_cast<int>(s.kv_heads);
  p.group = static_cast<int>(s.q_heads / s.kv_heads);
  p.causal = s.causal;
  p.scale = scale;
  p.scale_log2 = scale * attn::kLog2e;
  const auto* out_bf16 = static_cast<const attn::bf16*>(out);
  const bool sm90 = s.allow_sm90 && attn::DeviceRunsSm90a();
  // dK/dV: 4 warps x 16 keys per block, stepping over 64 queries (D = 64) or 32 (D = 128): each
  // lane holds dK and dV (2 x D/2 f32) plus S^T and dP^T (2 x kBM/8 x 4 f32); 64 query steps
  // spill at D = 128. dQ: 4 warps x 16 rows per block, stepping over 64 keys.
  switch (s.head_dim) {
    case 64:
      return attn::LaunchBackward<64, 4, 64, 4, 64>(stream, p, out_bf16, delta, s.batch, sm90,
                                                    layout.sem_bytes);
    case 128:
      return attn::LaunchBackward<128, 4, 32, 4, 64>(stream, p, out_bf16, delta, s.batch, sm90,
                                                     layout.sem_bytes);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace tandem::ops::cuda
