// Attention over a sequence of two chunks [c0, c1] composed from the block ops, on any context:
// rows of c0 see block (c0, c0) causal; rows of c1 see (c1, c0) full and (c1, c1) causal, merged
// in f32 (AttentionMerge); the backward sums the blocks' contributions in f32. This is step 0 of
// every ring-attention rank (parallel/ring_attention.h) without the ring, so it must equal
// AttentionForward / AttentionBackward over the whole sequence. Used by the CPU block test and
// the GPU ring test.
#pragma once

#include <cmath>
#include <vector>

#include "core/tensor.h"
#include "ops/context.h"
#include "ops/ops.h"

namespace tandem::ops::testing {

// On the context, sequence layout, the inputs' dtype (lse f32).
struct ChunkedResult {
  Tensor out, lse, dq, dk, dv;
};

namespace chunked_internal {

inline Tensor Chunk(const Tensor& t, int c) {
  Shape inner(t.shape().begin() + 1, t.shape().end());
  return t.Slice(0, c, c + 1).View(inner);
}
inline StatusOr<Tensor> New(Context& ctx, const Shape& shape, DType dtype, float fill) {
  TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(shape, dtype, ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(Fill(ctx, t, fill));
  return t;
}
// [B, 2 Tc, H, D] -> [2, B, Tc, H, D] in `dtype` (f32 accumulators start at `fill`).
inline Shape ChunkShape(const Tensor& x) { return {2, x.dim(0), x.dim(1) / 2, x.dim(2), x.dim(3)}; }
inline StatusOr<Tensor> ChunkMajor(Context& ctx, const Tensor& x) {
  TANDEM_ASSIGN_OR_RETURN(Tensor c, New(ctx, ChunkShape(x), x.dtype(), 0.0f));
  TANDEM_RETURN_IF_ERROR(ToChunkMajor(ctx, c, x));
  return c;
}
// acc (f32) += blk, via a cast when blk is bf16.
inline Status AddInto(Context& ctx, Tensor& acc, const Tensor& blk) {
  if (blk.dtype() == DType::kF32) return Add(ctx, acc, acc, blk);
  TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty(blk.shape(), DType::kF32, ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(Cast(ctx, t, blk));
  return Add(ctx, acc, acc, t);
}
// Rounds the f32 chunk-major acc to `like`'s dtype into a new sequence-layout tensor.
inline StatusOr<Tensor> Unchunk(Context& ctx, const Tensor& acc, const Tensor& like) {
  TANDEM_ASSIGN_OR_RETURN(Tensor rounded,
                          Tensor::Empty(acc.shape(), like.dtype(), ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(Cast(ctx, rounded, acc));
  TANDEM_ASSIGN_OR_RETURN(Tensor out, Tensor::Empty(like.shape(), like.dtype(), ctx.allocator()));
  TANDEM_RETURN_IF_ERROR(FromChunkMajor(ctx, out, rounded));
  return out;
}

struct Block {
  int q, kv;
  AttentionMask mask;
};
inline std::vector<Block> Blocks() {
  return {
      {0, 0, AttentionMask::kCausal}, {1, 1, AttentionMask::kCausal}, {1, 0, AttentionMask::kFull}};
}

}  // namespace chunked_internal

// q [B, 2 Tc, Hq, D], k, v [B, 2 Tc, Hkv, D], dout like q; contiguous, on ctx.
inline StatusOr<ChunkedResult> ChunkedAttention(Context& ctx, const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& dout, float scale) {
  using namespace chunked_internal;  // NOLINT
  const int64_t b = q.dim(0), tc = q.dim(1) / 2, hq = q.dim(2), d = q.dim(3), hkv = k.dim(2);
  TANDEM_ASSIGN_OR_RETURN(Tensor qc, ChunkMajor(ctx, q));
  TANDEM_ASSIGN_OR_RETURN(Tensor kc, ChunkMajor(ctx, k));
  TANDEM_ASSIGN_OR_RETURN(Tensor vc, ChunkMajor(ctx, v));
  TANDEM_ASSIGN_OR_RETURN(Tensor doc, ChunkMajor(ctx, dout));
  TANDEM_ASSIGN_OR_RETURN(Tensor acc, New(ctx, ChunkShape(q), DType::kF32, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(Tensor acc_lse, New(ctx, {2, b, hq, tc}, DType::kF32, -INFINITY));
  TANDEM_ASSIGN_OR_RETURN(Tensor blk_out, New(ctx, {b, tc, hq, d}, q.dtype(), NAN));
  TANDEM_ASSIGN_OR_RETURN(Tensor blk_lse, New(ctx, {b, hq, tc}, DType::kF32, NAN));
  for (const Block& blk : Blocks()) {
    TANDEM_RETURN_IF_ERROR(AttentionBlockForward(ctx, blk_out, blk_lse, Chunk(qc, blk.q),
                                                 Chunk(kc, blk.kv), Chunk(vc, blk.kv), scale,
                                                 blk.mask));
    Tensor a = Chunk(acc, blk.q), l = Chunk(acc_lse, blk.q);
    TANDEM_RETURN_IF_ERROR(AttentionMerge(ctx, a, l, blk_out, blk_lse));
  }
  ChunkedResult r;
  TANDEM_ASSIGN_OR_RETURN(r.out, Unchunk(ctx, acc, q));
  TANDEM_ASSIGN_OR_RETURN(r.lse, Tensor::Empty({b, hq, 2 * tc}, DType::kF32, ctx.allocator()));
  Tensor lse_seq = r.lse.View({b * hq, 2 * tc, 1, 1});
  TANDEM_RETURN_IF_ERROR(FromChunkMajor(ctx, lse_seq, acc_lse.View({2, b * hq, tc, 1, 1})));

  // Backward with the FINAL out and lse (chunk-major copies).
  TANDEM_ASSIGN_OR_RETURN(Tensor oc, ChunkMajor(ctx, r.out));
  TANDEM_ASSIGN_OR_RETURN(Tensor lsec, New(ctx, {2, b, hq, tc}, DType::kF32, 0.0f));
  Tensor lsec_seq = lsec.View({2, b * hq, tc, 1, 1});
  TANDEM_RETURN_IF_ERROR(ToChunkMajor(ctx, lsec_seq, lse_seq));
  TANDEM_ASSIGN_OR_RETURN(Tensor dq_acc, New(ctx, ChunkShape(q), DType::kF32, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(Tensor dk_acc, New(ctx, ChunkShape(k), DType::kF32, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(Tensor dv_acc, New(ctx, ChunkShape(k), DType::kF32, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(Tensor bdq, New(ctx, {b, tc, hq, d}, q.dtype(), NAN));
  TANDEM_ASSIGN_OR_RETURN(Tensor bdk, New(ctx, {b, tc, hkv, d}, q.dtype(), NAN));
  TANDEM_ASSIGN_OR_RETURN(Tensor bdv, New(ctx, {b, tc, hkv, d}, q.dtype(), NAN));
  for (const Block& blk : Blocks()) {
    TANDEM_RETURN_IF_ERROR(AttentionBlockBackward(
        ctx, bdq, bdk, bdv, Chunk(doc, blk.q), Chunk(qc, blk.q), Chunk(kc, blk.kv),
        Chunk(vc, blk.kv), Chunk(oc, blk.q), Chunk(lsec, blk.q), scale, blk.mask));
    Tensor dq_i = Chunk(dq_acc, blk.q), dk_j = Chunk(dk_acc, blk.kv), dv_j = Chunk(dv_acc, blk.kv);
    TANDEM_RETURN_IF_ERROR(AddInto(ctx, dq_i, bdq));
    TANDEM_RETURN_IF_ERROR(AddInto(ctx, dk_j, bdk));
    TANDEM_RETURN_IF_ERROR(AddInto(ctx, dv_j, bdv));
  }
  TANDEM_ASSIGN_OR_RETURN(r.dq, Unchunk(ctx, dq_acc, q));
  TANDEM_ASSIGN_OR_RETURN(r.dk, Unchunk(ctx, dk_acc, k));
  TANDEM_ASSIGN_OR_RETURN(r.dv, Unchunk(ctx, dv_acc, v));
  return r;
}

}  // namespace tandem::ops::testing
