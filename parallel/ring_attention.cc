// Ring attention (parallel/ring_attention.h): the forward and backward rings over chunk-major
// buffers. Every per-rank tensor [B, 2 * Tc, H, D] is moved once into the chunk-major layout
// [2, B, Tc, H, D] (ops::ToChunkMajor), where each chunk is a contiguous [B, Tc, H, D] tensor the
// block ops take; results are moved back at the end.
#include "parallel/ring_attention.h"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <utility>

#include "parallel/internal/ring_exchange.h"

namespace tandem::parallel {
namespace {

using internal::RingExchange;

// Message tags of one call (the forward and backward never interleave on one communicator).
constexpr int kTagKv = 7100;
constexpr int kTagDkv = 7101;

// Sizes of one rank's share: q [B, 2 * tc, hq, d], k and v [B, 2 * tc, hkv, d].
struct RingDims {
  int64_t b, tc, hq, hkv, d;
  DType dtype;
};

// Reads the dims off q and k and checks the shapes of the other tensors (`q_like`: [B, Tl, Hq, D],
// `kv_like`: [B, Tl, Hkv, D]; dtypes, devices and strides are checked by the ops that use them).
Status CheckShapes(const collectives::Communicator& cp, const Tensor& q, const Tensor& k,
                   std::initializer_list<std::pair<const Tensor*, const char*>> q_like,
                   std::initializer_list<std::pair<const Tensor*, const char*>> kv_like,
                   const Tensor& lse, RingDims* dims) {
  if (!q.defined() || !k.defined() || q.ndim() != 4 || k.ndim() != 4) {
    return InvalidArgumentError(StrCat("ring attention: expected q [B, Tl, Hq, D] and k [B, Tl, ",
                                       "Hkv, D], found q ", q.DebugString(), ", k ",
                                       k.DebugString()));
  }
  for (const auto& [t, name] : q_like) TANDEM_RETURN_IF_ERROR(ExpectShape(*t, q.shape(), name));
  for (const auto& [t, name] : kv_like) TANDEM_RETURN_IF_ERROR(ExpectShape(*t, k.shape(), name));
  TANDEM_RETURN_IF_ERROR(ExpectShape(lse, {q.dim(0), q.dim(2), q.dim(1)}, "lse"));
  TANDEM_RETURN_IF_ERROR(ExpectDType(lse, DType::kF32, "lse"));
  if (!lse.is_contiguous()) {
    return InvalidArgumentError(
        StrCat("ring attention: tensor 'lse' must be contiguous, found ", lse.DebugString()));
  }
  const int64_t tl = q.dim(1);
  if (tl % 2 != 0) {
    return InvalidArgumentError(
        StrCat("ring attention: the local sequence Tl=", tl, " on cp rank ", cp.rank(), " of '",
               cp.name(), "' must be even (two zig-zag chunks; the sequence T=", tl * cp.size(),
               " must be divisible by 2 * cp = ", 2 * cp.size(), ")"));
  }
  *dims = RingDims{q.dim(0), tl / 2, q.dim(2), k.dim(2), q.dim(3), q.dtype()};
  return Status::Ok();
}

StatusOr<Tensor> Empty(ops::Context& ctx, const Shape& shape, DType dtype) {
  return Tensor::Empty(shape, dtype, ctx.allocator());
}

// Chunk c ([B, Tc, H, D]) of a chunk-major tensor [2, B, Tc, H, D] (or [2, B, H, Tc] for lse).
Tensor Chunk(const Tensor& chunked, int c) {
  Shape inner(chunked.shape().begin() + 1, chunked.shape().end());
  return chunked.Slice(0, c, c + 1).View(inner);
}

// A [B, H, 2 * Tc] lse seen as the sequence layout [B * H, 2 * Tc, 1, 1] of ops::ToChunkMajor,
// and its chunk-major buffer [2, B, H, Tc] as [2, B * H, Tc, 1, 1].
Tensor LseAsSequence(const Tensor& lse) {
  return lse.View({lse.dim(0) * lse.dim(1), lse.dim(2), 1, 1});
}
Tensor LseChunkedAsSequence(const Tensor& chunked) {
  return chunked.View({2, chunked.dim(1) * chunked.dim(2), chunked.dim(3), 1, 1});
}

// Moves a [B, 2 * Tc, H, D] tensor into a new chunk-major [2, B, Tc, H, D] one.
StatusOr<Tensor> ChunkMajorCopy(ops::Context& ctx, const Tensor& x, int64_t tc) {
  TANDEM_ASSIGN_OR_RETURN(Tensor c, Empty(ctx, {2, x.dim(0), tc, x.dim(2), x.dim(3)}, x.dtype()));
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, c, x));
  return c;
}

// Rounds a chunk-major f32 accumulator to `dst`'s dtype and moves it to dst's sequence layout.
Status StoreFromChunkMajor(ops::Context& ctx, Tensor& dst, const Tensor& acc) {
  Tensor rounded = acc;
  if (dst.dtype() != acc.dtype()) {
    TANDEM_ASSIGN_OR_RETURN(rounded, Empty(ctx, acc.shape(), dst.dtype()));
    TANDEM_RETURN_IF_ERROR(ops::Cast(ctx, rounded, acc));
  }
  return ops::FromChunkMajor(ctx, dst, rounded);
}

// acc (f32) += blk (acc's shape; f32 or the attention dtype), through the front of `tmp` (f32, at
// least blk's numel) when blk is not f32.
Status Accumulate(ops::Context& ctx, Tensor& acc, const Tensor& blk, Tensor& tmp) {
  if (blk.dtype() == DType::kF32) return ops::Add(ctx, acc, acc, blk);
  Tensor t = tmp.Slice(0, 0, blk.numel()).View(blk.shape());
  TANDEM_RETURN_IF_ERROR(ops::Cast(ctx, t, blk));
  return ops::Add(ctx, acc, acc, t);
}

Status WithRank(const Status& st, const collectives::Communicator& cp, const char* what) {
  if (st.ok()) return st;
  return st.WithContext(
      StrCat(what, " on cp rank ", cp.rank(), " of '", cp.name(), "' (size ", cp.size(), ")"));
}

Status ForwardRing(ops::Context& ctx, collectives::Communicator& cp, Tensor& out, Tensor& lse,
                   const Tensor& q, const Tensor& k, const Tensor& v, float scale) {
  RingDims g;
  TANDEM_RETURN_IF_ERROR(CheckShapes(cp, q, k, {{&out, "out"}}, {{&v, "v"}}, lse, &g));
  TANDEM_ASSIGN_OR_RETURN(RingExchange xchg, RingExchange::Create(ctx, cp));
  TANDEM_ASSIGN_OR_RETURN(Tensor qc, ChunkMajorCopy(ctx, q, g.tc));  // [2, B, Tc, Hq, D]
  // K/V of one rank as a single message: [2 (k, v), 2 (chunk), B, Tc, Hkv, D], double-buffered.
  const Shape kv_shape{2, 2, g.b, g.tc, g.hkv, g.d};
  Tensor kv[2];
  for (Tensor& t : kv) {
    TANDEM_ASSIGN_OR_RETURN(t, Empty(ctx, kv_shape, g.dtype));
  }
  Tensor k_home = Chunk(kv[0], 0), v_home = Chunk(kv[0], 1);
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, k_home, k));
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, v_home, v));

  TANDEM_ASSIGN_OR_RETURN(Tensor acc, Empty(ctx, {2, g.b, g.tc, g.hq, g.d}, DType::kF32));
  TANDEM_ASSIGN_OR_RETURN(Tensor acc_lse, Empty(ctx, {2, g.b, g.hq, g.tc}, DType::kF32));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, acc, 0.0f));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, acc_lse, -INFINITY));
  TANDEM_ASSIGN_OR_RETURN(Tensor blk_out, Empty(ctx, {g.b, g.tc, g.hq, g.d}, g.dtype));
  TANDEM_ASSIGN_OR_RETURN(Tensor blk_lse, Empty(ctx, {g.b, g.hq, g.tc}, DType::kF32));

  const int n = cp.size();
  for (int step = 0; step < n; ++step) {
    Tensor& cur = kv[step % 2];
    if (step + 1 < n) TANDEM_RETURN_IF_ERROR(xchg.Start(cur, kv[(step + 1) % 2], kTagKv));
    const Tensor kc = Chunk(cur, 0), vc = Chunk(cur, 1);
    for (const RingBlock& blk : RingStepBlocks(n, cp.rank(), step)) {
      TANDEM_RETURN_IF_ERROR(ops::AttentionBlockForward(
          ctx, blk_out, blk_lse, Chunk(qc, blk.q_chunk), Chunk(kc, blk.kv_chunk),
          Chunk(vc, blk.kv_chunk), scale, blk.mask));
      Tensor acc_q = Chunk(acc, blk.q_chunk), acc_lse_q = Chunk(acc_lse, blk.q_chunk);
      TANDEM_RETURN_IF_ERROR(ops::AttentionMerge(ctx, acc_q, acc_lse_q, blk_out, blk_lse));
    }
    if (step + 1 < n) TANDEM_RETURN_IF_ERROR(xchg.Finish());
  }
  TANDEM_RETURN_IF_ERROR(StoreFromChunkMajor(ctx, out, acc));
  Tensor lse_seq = LseAsSequence(lse);
  return ops::FromChunkMajor(ctx, lse_seq, LseChunkedAsSequence(acc_lse));
}

// The per-step scratch of the backward: one block's gradients and an f32 staging buffer.
struct BlockGrads {
  Tensor dq, dk, dv;  // [B, Tc, Hq, D], [B, Tc, Hkv, D] x 2, attention dtype
  Tensor tmp;         // f32, B * Tc * Hq * D elements (unused when the dtype is f32)
};

Status BackwardRing(ops::Context& ctx, collectives::Communicator& cp, Tensor& dq, Tensor& dk,
                    Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                    const Tensor& v, const Tensor& out, const Tensor& lse, float scale) {
  RingDims g;
  TANDEM_RETURN_IF_ERROR(CheckShapes(cp, q, k, {{&out, "out"}, {&dout, "dout"}, {&dq, "dq"}},
                                     {{&v, "v"}, {&dk, "dk"}, {&dv, "dv"}}, lse, &g));
  TANDEM_ASSIGN_OR_RETURN(RingExchange xchg, RingExchange::Create(ctx, cp));
  TANDEM_ASSIGN_OR_RETURN(Tensor qc, ChunkMajorCopy(ctx, q, g.tc));
  TANDEM_ASSIGN_OR_RETURN(Tensor oc, ChunkMajorCopy(ctx, out, g.tc));
  TANDEM_ASSIGN_OR_RETURN(Tensor doc, ChunkMajorCopy(ctx, dout, g.tc));
  TANDEM_ASSIGN_OR_RETURN(Tensor lsec, Empty(ctx, {2, g.b, g.hq, g.tc}, DType::kF32));
  Tensor lsec_view = LseChunkedAsSequence(lsec);
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, lsec_view, LseAsSequence(lse)));

  const Shape kv_shape{2, 2, g.b, g.tc, g.hkv, g.d};
  // dkv: the f32 dK/dV accumulators that travel with their K/V (receive buffers, alternating);
  // local: this step's contributions when an accumulator is in flight.
  Tensor kv[2], dkv[2], local;
  for (int i = 0; i < 2; ++i) {
    TANDEM_ASSIGN_OR_RETURN(kv[i], Empty(ctx, kv_shape, g.dtype));
    TANDEM_ASSIGN_OR_RETURN(dkv[i], Empty(ctx, kv_shape, DType::kF32));
  }
  TANDEM_ASSIGN_OR_RETURN(local, Empty(ctx, kv_shape, DType::kF32));
  Tensor k_home = Chunk(kv[0], 0), v_home = Chunk(kv[0], 1);
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, k_home, k));
  TANDEM_RETURN_IF_ERROR(ops::ToChunkMajor(ctx, v_home, v));
  TANDEM_ASSIGN_OR_RETURN(Tensor dq_acc, Empty(ctx, {2, g.b, g.tc, g.hq, g.d}, DType::kF32));
  TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, dq_acc, 0.0f));
  TANDEM_ASSIGN_OR_RETURN(RingExchange dkv_xchg, RingExchange::Create(ctx, cp));

  BlockGrads bg;
  TANDEM_ASSIGN_OR_RETURN(bg.dq, Empty(ctx, {g.b, g.tc, g.hq, g.d}, g.dtype));
  TANDEM_ASSIGN_OR_RETURN(bg.dk, Empty(ctx, {g.b, g.tc, g.hkv, g.d}, g.dtype));
  TANDEM_ASSIGN_OR_RETURN(bg.dv, Empty(ctx, {g.b, g.tc, g.hkv, g.d}, g.dtype));
  if (g.dtype != DType::kF32) {
    TANDEM_ASSIGN_OR_RETURN(bg.tmp, Empty(ctx, {g.b * g.tc * g.hq * g.d}, DType::kF32));
  }

  // Step s: the accumulator of the K/V held now arrives from rank - 1 (sent at its step s - 1)
  // while this rank computes its contributions into `local` (step 0: straight into dkv[0], as
  // nothing is in flight); the sum then leaves for rank + 1 while step s + 1 computes. After the
  // last step's send every accumulator is back home, in dkv[n % 2].
  const int n = cp.size();
  for (int step = 0; step < n; ++step) {
    Tensor& cur = kv[step % 2];
    if (step + 1 < n) TANDEM_RETURN_IF_ERROR(xchg.Start(cur, kv[(step + 1) % 2], kTagKv));
    Tensor& arrived = dkv[step % 2];
    Tensor& target = step == 0 ? arrived : local;
    TANDEM_RETURN_IF_ERROR(ops::Fill(ctx, target, 0.0f));
    const Tensor kc = Chunk(cur, 0), vc = Chunk(cur, 1);
    Tensor dkc = Chunk(target, 0), dvc = Chunk(target, 1);
    for (const RingBlock& blk : RingStepBlocks(n, cp.rank(), step)) {
      const int i = blk.q_chunk, j = blk.kv_chunk;
      TANDEM_RETURN_IF_ERROR(ops::AttentionBlockBackward(
          ctx, bg.dq, bg.dk, bg.dv, Chunk(doc, i), Chunk(qc, i), Chunk(kc, j), Chunk(vc, j),
          Chunk(oc, i), Chunk(lsec, i), scale, blk.mask));
      Tensor dq_i = Chunk(dq_acc, i), dk_j = Chunk(dkc, j), dv_j = Chunk(dvc, j);
      TANDEM_RETURN_IF_ERROR(Accumulate(ctx, dq_i, bg.dq, bg.tmp));
      TANDEM_RETURN_IF_ERROR(Accumulate(ctx, dk_j, bg.dk, bg.tmp));
      TANDEM_RETURN_IF_ERROR(Accumulate(ctx, dv_j, bg.dv, bg.tmp));
    }
    if (step > 0) {
      TANDEM_RETURN_IF_ERROR(dkv_xchg.Finish());
      TANDEM_RETURN_IF_ERROR(ops::Add(ctx, arrived, arrived, local));
    }
    TANDEM_RETURN_IF_ERROR(dkv_xchg.Start(arrived, dkv[(step + 1) % 2], kTagDkv));
    if (step + 1 < n) TANDEM_RETURN_IF_ERROR(xchg.Finish());
  }
  TANDEM_RETURN_IF_ERROR(dkv_xchg.Finish());
  const Tensor& dkv_home = dkv[n % 2];
  TANDEM_RETURN_IF_ERROR(StoreFromChunkMajor(ctx, dq, dq_acc));
  TANDEM_RETURN_IF_ERROR(StoreFromChunkMajor(ctx, dk, Chunk(dkv_home, 0)));
  return StoreFromChunkMajor(ctx, dv, Chunk(dkv_home, 1));
}

}  // namespace

std::vector<RingBlock> RingStepBlocks(int cp_size, int cp_rank, int step) {
  TANDEM_CHECK_MSG(cp_size >= 1 && cp_rank >= 0 && cp_rank < cp_size && step >= 0 && step < cp_size,
                   "RingStepBlocks(cp_size=", cp_size, ", cp_rank=", cp_rank, ", step=", step, ")");
  using ops::AttentionMask;
  const int src = ((cp_rank - step) % cp_size + cp_size) % cp_size;
  if (src == cp_rank) {
    return {{0, 0, AttentionMask::kCausal},
            {1, 1, AttentionMask::kCausal},
            {1, 0, AttentionMask::kFull}};
  }
  if (src < cp_rank) return {{0, 0, AttentionMask::kFull}, {1, 0, AttentionMask::kFull}};
  return {{1, 0, AttentionMask::kFull}, {1, 1, AttentionMask::kFull}};
}

std::vector<int64_t> ZigZagIndices(int64_t seq, int cp_size, int cp_rank) {
  TANDEM_CHECK_MSG(
      cp_size >= 1 && cp_rank >= 0 && cp_rank < cp_size && seq >= 0 && seq % (2 * cp_size) == 0,
      "ZigZagIndices: seq=", seq, " must be divisible by 2 * cp_size=", 2 * cp_size,
      ", cp_rank=", cp_rank);
  const int64_t tc = seq / (2 * cp_size);
  std::vector<int64_t> idx;
  idx.reserve(2 * tc);
  for (int64_t c : {int64_t{cp_rank}, int64_t{2 * cp_size - 1 - cp_rank}}) {
    for (int64_t t = 0; t < tc; ++t) idx.push_back(c * tc + t);
  }
  return idx;
}

namespace {

// Checks the global host tensor of ZigZagLocal / ZigZagPlace.
Status CheckZigZag(const Tensor& global, int cp_size, int cp_rank, int seq_dim, const char* what) {
  if (!global.defined() || !global.device().is_cpu() || !global.is_contiguous() || seq_dim < 0 ||
      seq_dim >= global.ndim()) {
    return InvalidArgumentError(StrCat(what, ": expected a contiguous host tensor with a sequence ",
                                       "dim ", seq_dim, ", found ", global.DebugString()));
  }
  if (cp_size < 1 || cp_rank < 0 || cp_rank >= cp_size) {
    return InvalidArgumentError(
        StrCat(what, ": cp_rank ", cp_rank, " outside a group of ", cp_size));
  }
  const int64_t seq = global.dim(seq_dim);
  if (seq % (2 * cp_size) != 0) {
    return InvalidArgumentError(StrCat(what, ": sequence length ", seq, " (dim ", seq_dim, " of ",
                                       global.DebugString(),
                                       ") must be divisible by 2 * cp = ", 2 * cp_size));
  }
  return Status::Ok();
}

Shape LocalShape(const Tensor& global, int cp_size, int seq_dim) {
  Shape s = global.shape();
  if (seq_dim >= 0 && seq_dim < global.ndim()) s[seq_dim] /= cp_size;
  return s;
}

// Copies between global [outer, T, inner] and local [outer, T / cp, inner] rows in zig-zag order.
void ZigZagCopy(const Tensor& global, const Tensor& local, int cp_size, int cp_rank, int seq_dim,
                bool to_local) {
  const int64_t seq = global.dim(seq_dim);
  int64_t outer = 1, inner = 1;
  for (int i = 0; i < seq_dim; ++i) outer *= global.dim(i);
  for (int i = seq_dim + 1; i < global.ndim(); ++i) inner *= global.dim(i);
  const size_t row_bytes = static_cast<size_t>(inner) * DTypeSize(global.dtype());
  const std::vector<int64_t> idx = ZigZagIndices(seq, cp_size, cp_rank);
  const int64_t tl = static_cast<int64_t>(idx.size());
  char* g = static_cast<char*>(global.raw_data());
  char* l = static_cast<char*>(local.raw_data());
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < tl; ++i) {
      char* gp = g + (o * seq + idx[i]) * row_bytes;
      char* lp = l + (o * tl + i) * row_bytes;
      if (to_local) {
        std::memcpy(lp, gp, row_bytes);
      } else {
        std::memcpy(gp, lp, row_bytes);
      }
    }
  }
}

}  // namespace

StatusOr<Tensor> ZigZagLocal(const Tensor& global, int cp_size, int cp_rank, int seq_dim) {
  TANDEM_RETURN_IF_ERROR(CheckZigZag(global, cp_size, cp_rank, seq_dim, "ZigZagLocal"));
  Tensor local = Tensor::Cpu(LocalShape(global, cp_size, seq_dim), global.dtype());
  ZigZagCopy(global, local, cp_size, cp_rank, seq_dim, /*to_local=*/true);
  return local;
}

Status ZigZagPlace(Tensor& global, const Tensor& local, int cp_size, int cp_rank, int seq_dim) {
  TANDEM_RETURN_IF_ERROR(CheckZigZag(global, cp_size, cp_rank, seq_dim, "ZigZagPlace"));
  const Shape want = LocalShape(global, cp_size, seq_dim);
  if (!local.defined() || !local.device().is_cpu() || !local.is_contiguous() ||
      local.shape() != want || local.dtype() != global.dtype()) {
    return InvalidArgumentError(StrCat("ZigZagPlace: expected local ", DTypeName(global.dtype()),
                                       ShapeToString(want), " contiguous on cpu, found ",
                                       local.DebugString()));
  }
  ZigZagCopy(global, local, cp_size, cp_rank, seq_dim, /*to_local=*/false);
  return Status::Ok();
}

Status RingAttentionForward(ops::Context& ctx, collectives::Communicator& cp, Tensor& out,
                            Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                            float scale) {
  if (cp.size() == 1) return ops::AttentionForward(ctx, out, lse, q, k, v, scale);
  return WithRank(ForwardRing(ctx, cp, out, lse, q, k, v, scale), cp, "RingAttentionForward");
}

Status RingAttentionBackward(ops::Context& ctx, collectives::Communicator& cp, Tensor& dq,
                             Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,
                             const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                             float scale) {
  if (cp.size() == 1) {
    return ops::AttentionBackward(ctx, dq, dk, dv, dout, q, k, v, out, lse, scale);
  }
  return WithRank(BackwardRing(ctx, cp, dq, dk, dv, dout, q, k, v, out, lse, scale), cp,
                  "RingAttentionBackward");
}

}  // namespace tandem::parallel
