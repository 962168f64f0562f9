// Context-parallel causal attention: ring attention over the cp ranks of a mesh, with zig-zag
// chunking so that every rank does the same work.
//
// Layout. The T tokens of each sequence are cut into 2 * cp equal chunks of Tc = T / (2 * cp).
// cp rank c holds chunk c followed by chunk 2cp-1-c (ZigZagIndices), Tl = T / cp = 2 * Tc tokens
// of q, k and v. Positions stay global (RoPE uses ZigZagIndices); attention is causal over global
// positions.
//
// The ring. At step s (0 <= s < cp) rank r holds the K/V (both chunks) of rank src = (r - s) mod
// cp and passes them to rank r + 1 while it computes (SendRecv with rank r - 1). With q chunks
// (a0, a1) = (r, 2cp-1-r) and kv chunks (b0, b1) = (src, 2cp-1-src), the four (q, kv) chunk pairs
// are (RingStepBlocks):
//   s = 0 (src == r):  (a0, b0) causal, (a1, b1) causal, (a1, b0) full, (a0, b1) empty
//   src < r:           (a0, b0) full,   (a1, b0) full,   (a0, b1) and (a1, b1) empty
//   src > r:           (a1, b0) full,   (a1, b1) full,   (a0, b0) and (a0, b1) empty
// ("full": every key is before every query; "causal": the same chunk, key j visible to query i
// iff j <= i). Every step costs every rank two chunk-pairs of work (two half-pairs plus one pair
// at step 0), so the ranks stay in lockstep.
// Each block is ops::AttentionBlockForward on Tc x Tc; partial results are merged in f32
// (ops::AttentionMerge) into a running out and lse, rounded to the input dtype once at the end.
// The backward is a ring too: K/V travel again, together with f32 dK/dV accumulators that every
// rank adds its blocks' contributions to (ops::AttentionBlockBackward with the FINAL out and
// lse); after cp steps and one more shift the accumulators arrive back at their owner. dQ is
// accumulated locally in f32.
//
// Communication. Host communicators (MPI, threads) finish each SendRecv before returning, so
// steps simply alternate send and compute. On NCCL with a stream other than ctx.stream(), the
// K/V exchange for step s + 1 runs on the communicator's stream while step s computes, and in the
// backward the dK/dV accumulator of step s travels on while step s + 1 computes (into a local
// buffer that is added once the accumulator has arrived), ordered by CUDA events. With
// cp.size() == 1 both calls are exactly the plain ops::AttentionForward / AttentionBackward.
//
// Numerics: CPU f32 (matches ops::AttentionForward/Backward on the full sequence to ~1e-6);
// CUDA bf16 inputs and outputs with f32 accumulation of partial outputs and gradients.
// Deterministic: the same inputs and cp size give bitwise-identical results.
//
// Thread-safety: as ops; one call at a time per context and communicator. Packed documents
// (segment ids) are not supported under cp > 1.
#pragma once

#include <cstdint>
#include <vector>

#include "collectives/communicator.h"
#include "core/status.h"
#include "core/tensor.h"
#include "ops/context.h"
#include "ops/ops.h"

namespace tandem::parallel {

// q [B, Tl, Hq, D], k, v [B, Tl, Hkv, D]: this rank's zig-zag chunks (Tl = T / cp: chunk c then
// chunk 2cp-1-c of the 2cp equal chunks of the sequence). out [B, Tl, Hq, D], lse f32
// [B, Hq, Tl] (same layouts, dtypes and token-stride rules as ops::AttentionForward). Causal over
// GLOBAL positions. Tl must be even (T divisible by 2 * cp): InvalidArgument otherwise. The
// communicator must hold buffers on ctx.device() (threads/MPI for CPU, NCCL for CUDA). Every cp
// rank calls it with the same shapes.
Status RingAttentionForward(ops::Context& ctx, collectives::Communicator& cp, Tensor& out,
                            Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                            float scale);
// dq [B, Tl, Hq, D], dk, dv [B, Tl, Hkv, D] overwritten (token stride free, each matching its
// input's stride as in ops::AttentionBackward); out and lse from RingAttentionForward.
Status RingAttentionBackward(ops::Context& ctx, collectives::Communicator& cp, Tensor& dq,
                             Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                             const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                             float scale);

// The global token indices cp rank `cp_rank` holds, in local order: chunk cp_rank, then chunk
// 2 * cp_size - 1 - cp_rank, of Tc = seq / (2 * cp_size) tokens each. Precondition (checked):
// seq % (2 * cp_size) == 0 and 0 <= cp_rank < cp_size.
std::vector<int64_t> ZigZagIndices(int64_t seq, int cp_size, int cp_rank);

// One (query chunk, kv chunk) block of a ring step; chunks are local indices (0: the first of the
// two chunks a rank holds, 1: the second).
struct RingBlock {
  int q_chunk;
  int kv_chunk;
  ops::AttentionMask mask;
};
// The non-empty blocks rank `cp_rank` computes at step `step` (table above), in compute order.
std::vector<RingBlock> RingStepBlocks(int cp_size, int cp_rank, int step);

// Host helpers for tests and the model's data path. `global` is a contiguous host tensor of any
// dtype whose dim `seq_dim` is the sequence (T, divisible by 2 * cp_size); the local tensor has
// T / cp_size there, in zig-zag order (ZigZagIndices).
StatusOr<Tensor> ZigZagLocal(const Tensor& global, int cp_size, int cp_rank, int seq_dim = 1);
// Writes `local` (a ZigZagLocal-shaped contiguous host tensor) into its positions of `global`.
Status ZigZagPlace(Tensor& global, const Tensor& local, int cp_size, int cp_rank, int seq_dim = 1);

}  // namespace tandem::parallel
