// ops::AttentionMerge, ops::ToChunkMajor, ops::FromChunkMajor: the pieces besides the block
// kernels that context-parallel ring attention (parallel/ring_attention.h) is made of.
#include <cstring>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

// Copies `rows` rows of `row_bytes` bytes from src (row pitch src_pitch bytes) to dst (pitch
// dst_pitch) on the context's device.
Status CopyRows(Context& ctx, char* dst, size_t dst_pitch, const char* src, size_t src_pitch,
                size_t row_bytes, int64_t rows, const char* op) {
  if (rows == 0 || row_bytes == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, static_cast<size_t>(rows),
                          cudaMemcpyDeviceToDevice, internal::StreamOf(ctx));
    return internal::CudaResult(err, op, ctx, [&] { return StrCat(rows, " rows"); });
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dst_pitch, src + r * src_pitch, row_bytes);
  }
  return Status::Ok();
}

// Validates chunked [C, B, Tc, H, D] (contiguous) against x [B, C * Tc, H, D] (token stride
// free, same dtype) and moves tokens one way or the other: one strided copy per chunk when x is
// contiguous, per (chunk, batch) row otherwise.
Status MoveChunks(const char* op, Context& ctx, const Tensor& chunked, const Tensor& x,
                  bool to_chunk_major) {
  internal::OpChecker chk(op, ctx);
  if (!chk.Ranked(chunked, "chunked", 5) || !chk.Ranked(x, "x", 4)) return chk.status();
  const Dim c{"C", chunked.dim(0)}, b{"B", chunked.dim(1)}, tc{"Tc", chunked.dim(2)},
      h{"H", chunked.dim(3)}, d{"D", chunked.dim(4)};
  const Dim t{"C*Tc", c.size * tc.size};
  chk.Expect(x, "x", {b, t, h, d}, {x.dtype()}, Layout::TokenStrideFree());
  chk.Expect(chunked, "chunked", {c, b, tc, h, d}, {x.dtype()}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  const size_t es = DTypeSize(x.dtype());
  const size_t token_bytes = static_cast<size_t>(h.size * d.size) * es;
  const size_t x_pitch = static_cast<size_t>(internal::LeadingStride(x, 1)) * es;
  char* xp = static_cast<char*>(x.raw_data());
  char* cp = static_cast<char*>(chunked.raw_data());
  if (x_pitch == token_bytes) {  // contiguous x: one strided copy of B rows per chunk
    const size_t chunk_bytes = static_cast<size_t>(tc.size) * token_bytes;
    for (int64_t ci = 0; ci < c.size; ++ci) {
      char* xrow = xp + ci * chunk_bytes;
      char* crow = cp + ci * b.size * chunk_bytes;
      const size_t x_row_pitch = static_cast<size_t>(c.size) * chunk_bytes;
      const Status st =
          to_chunk_major
              ? CopyRows(ctx, crow, chunk_bytes, xrow, x_row_pitch, chunk_bytes, b.size, op)
              : CopyRows(ctx, xrow, x_row_pitch, crow, chunk_bytes, chunk_bytes, b.size, op);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }
  for (int64_t ci = 0; ci < c.size; ++ci) {
    for (int64_t bi = 0; bi < b.size; ++bi) {
      char* xrow = xp + (bi * t.size + ci * tc.size) * x_pitch;
      char* crow = cp + ((ci * b.size + bi) * tc.size) * token_bytes;
      const Status st =
          to_chunk_major
              ? CopyRows(ctx, crow, token_bytes, xrow, x_pitch, token_bytes, tc.size, op)
              : CopyRows(ctx, xrow, x_pitch, crow, token_bytes, token_bytes, tc.size, op);
      if (!st.ok()) return st;
    }
  }
  return Status::Ok();
}

}  // namespace

Status AttentionMerge(Context& ctx, Tensor& out_acc, Tensor& lse_acc, const Tensor& out_blk,
                      const Tensor& lse_blk) {
  ProfileScope profile(ctx, "attention_fwd");
  internal::OpChecker chk("AttentionMerge", ctx);
  if (!chk.Ranked(out_acc, "out_acc", 4)) return chk.status();
  const Dim b{"B", out_acc.dim(0)}, t{"T", out_acc.dim(1)}, h{"H", out_acc.dim(2)},
      d{"D", out_acc.dim(3)};
  const internal::DTypeSet blk_dtypes = internal::FloatDTypes(ctx);
  chk.Expect(out_acc, "out_acc", {b, t, h, d}, {DType::kF32}, Layout::Contiguous());
  chk.Expect(lse_acc, "lse_acc", {b, h, t}, {DType::kF32}, Layout::Contiguous());
  chk.Expect(out_blk, "out_blk", {b, t, h, d}, blk_dtypes, Layout::Contiguous());
  chk.Expect(lse_blk, "lse_blk", {b, h, t}, {DType::kF32}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (out_acc.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::AttentionMerge(
        internal::StreamOf(ctx), out_blk.dtype(), out_acc.data<float>(), lse_acc.data<float>(),
        out_blk.raw_data(), lse_blk.data<float>(), b.size, t.size, h.size, d.size);
    return internal::CudaResult(err, "AttentionMerge", ctx,
                                [&] { return ShapeToString(out_acc.shape()); });
  }
#endif
  cpu::AttentionMerge(out_acc.data<float>(), lse_acc.data<float>(), out_blk.data<float>(),
                      lse_blk.data<float>(), b.size, t.size, h.size, d.size);
  return Status::Ok();
}

Status ToChunkMajor(Context& ctx, Tensor& chunked, const Tensor& x) {
  ProfileScope profile(ctx, "elementwise");
  return MoveChunks("ToChunkMajor", ctx, chunked, x, /*to_chunk_major=*/true);
}

Status FromChunkMajor(Context& ctx, Tensor& x, const Tensor& chunked) {
  ProfileScope profile(ctx, "elementwise");
  return MoveChunks("FromChunkMajor", ctx, chunked, x, /*to_chunk_major=*/false);
}

}  // namespace tandem::ops
