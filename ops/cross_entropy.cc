// ops::CrossEntropy: validation and dispatch.
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

constexpr char kOp[] = "CrossEntropy";

// Targets are read on the host only for CPU tensors (a device check would need a sync).
Status CheckTargets(const Tensor& targets, int64_t vocab) {
  const int32_t* p = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (p[i] != kIgnoreIndex && (p[i] < 0 || p[i] >= vocab)) {
      return InvalidArgumentError(StrCat(kOp, ": tensor 'targets': targets[", i, "] = ", p[i],
                                         " is neither in [0, V=", vocab, ") nor kIgnoreIndex (",
                                         kIgnoreIndex, ")"));
    }
  }
  return Status::Ok();
}

Status Validate(Context& ctx, const Tensor& losses, const Tensor& dlogits, const Tensor& logits,
                const Tensor& targets, float grad_scale) {
  internal::OpChecker chk(kOp, ctx);
  if (!chk.Ranked(logits, "logits", 2)) return chk.status();
  const Dim n{"N", logits.dim(0)}, v{"V", logits.dim(1)};
  chk.Expect(logits, "logits", {n, v}, internal::FloatDTypes(ctx), Layout::Contiguous());
  chk.Expect(targets, "targets", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(losses, "losses", {n}, {DType::kF32}, Layout::Contiguous());
  if (dlogits.defined())
    chk.Expect(dlogits, "dlogits", {n, v}, {logits.dtype()}, Layout::Contiguous());
  chk.Require(v.size > 0, "tensor 'logits': vocabulary V must be > 0");
  chk.Require(std::isfinite(grad_scale), "grad_scale must be finite, found ", grad_scale);
  if (!chk.ok() || ctx.is_cuda()) return chk.status();
  return CheckTargets(targets, v.size);
}

}  // namespace

Status CrossEntropy(Context& ctx, Tensor& losses, Tensor& dlogits, const Tensor& logits,
                    const Tensor& targets, float grad_scale) {
  ProfileScope profile(ctx, "loss");
  if (Status s = Validate(ctx, losses, dlogits, logits, targets, grad_scale); !s.ok()) return s;
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  if (rows == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::CrossEntropy(internal::StreamOf(ctx), logits.dtype(), losses.data<float>(),
                           dlogits.defined() ? dlogits.raw_data() : nullptr, logits.raw_data(),
                           targets.data<int32_t>(), rows, vocab, grad_scale);
    return internal::CudaResult(err, kOp, ctx,
                                [&] { return internal::Describe("logits", logits); });
  }
#endif
  cpu::CrossEntropy(losses.data<float>(), dlogits.defined() ? dlogits.data<float>() : nullptr,
                    logits.data<float>(), targets.data<int32_t>(), rows, vocab, grad_scale,
                    kIgnoreIndex);
  return Status::Ok();
}

}  // namespace tandem::ops
