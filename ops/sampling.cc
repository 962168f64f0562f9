// ops::ArgmaxRows (ops/sampling.h): validation and dispatch.
#include "ops/sampling.h"

#include "ops/internal/op_util.h"
#include "ops/internal/sampling_kernels.h"
#include "ops/profiler.h"

namespace tandem::ops {

Status ArgmaxRows(Context& ctx, Tensor& ids, const Tensor& logits, int64_t valid) {
  ProfileScope profile(ctx, "sampling");
  internal::OpChecker chk("ArgmaxRows", ctx);
  if (!chk.Ranked(logits, "logits", 2)) return chk.status();
  const internal::Dim r{"R", logits.dim(0)}, v{"V", logits.dim(1)};
  chk.Expect(logits, "logits", {r, v}, internal::FloatDTypes(ctx),
             internal::Layout::RowStrideFree());
  chk.Expect(ids, "ids", {r}, {DType::kI32}, internal::Layout::Contiguous());
  chk.Require(valid >= 1 && valid <= v.size, "valid must be in [1, V=", v.size, "], found ", valid);
  if (!chk.ok()) return chk.status();
  if (r.size == 0) return Status::Ok();
  const int64_t stride = internal::LeadingStride(logits, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::ArgmaxRows(internal::StreamOf(ctx), logits.dtype(), ids.data<int32_t>(),
                         logits.raw_data(), r.size, stride, valid, kArgmaxInvalidRow);
    return internal::CudaResult(err, "ArgmaxRows", ctx,
                                [&] { return internal::Describe("logits", logits); });
  }
#endif
  cpu::ArgmaxRows(ids.data<int32_t>(), logits.data<float>(), r.size, stride, valid,
                  kArgmaxInvalidRow);
  return Status::Ok();
}

}  // namespace tandem::ops
