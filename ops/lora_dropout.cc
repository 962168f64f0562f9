// ops::LoraDropoutAt (ops/lora.h): the LoRA dropout mask at global row and column indices.
#include "ops/internal/lora_kernels.h"
#include "ops/internal/op_util.h"
#include "ops/lora.h"
#include "ops/profiler.h"

namespace tandem::ops {

Status LoraDropoutAt(Context& ctx, Tensor& y, const Tensor& x, uint64_t seed, float p,
                     bool accumulate, const Tensor& row_ids, int64_t col_offset) {
  ProfileScope profile(ctx, "lora");
  using internal::Dim;
  using internal::Layout;
  internal::OpChecker chk("LoraDropoutAt", ctx);
  if (!chk.Ranked(x, "x", 2)) return chk.status();
  const Dim n{"N", x.dim(0)}, c{"C", x.dim(1)};
  chk.Expect(x, "x", {n, c}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
  chk.Expect(y, "y", {n, c}, {x.dtype()}, Layout::RowStrideFree());
  if (row_ids.defined()) chk.Expect(row_ids, "row_ids", {n}, {DType::kI64}, Layout::Contiguous());
  chk.Require(p >= 0.0f && p < 1.0f, "p must be in [0, 1), found ", p);
  chk.Require(col_offset >= 0, "col_offset must be >= 0, found ", col_offset);
  if (!chk.ok()) return chk.status();
  if (x.numel() == 0) return Status::Ok();
  const int64_t ldx = internal::LeadingStride(x, 0), ldy = internal::LeadingStride(y, 0);
  const int64_t* ids = row_ids.defined() ? row_ids.data<int64_t>() : nullptr;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::LoraDropoutAt(internal::StreamOf(ctx), x.dtype(), y.raw_data(), ldy, x.raw_data(),
                            ldx, x.dim(0), x.dim(1), ids, col_offset, seed, p, accumulate);
    return internal::CudaResult(err, "LoraDropoutAt", ctx,
                                [&] { return internal::Describe("x", x); });
  }
#endif
  cpu::LoraDropoutAt(y.data<float>(), ldy, x.data<float>(), ldx, x.dim(0), x.dim(1), ids,
                     col_offset, seed, p, accumulate);
  return Status::Ok();
}

}  // namespace tandem::ops
