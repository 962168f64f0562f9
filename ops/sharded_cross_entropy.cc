// ops::ShardedCrossEntropyPartials / ShardedCrossEntropyFinish: validation and dispatch.
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

constexpr char kPartials[] = "ShardedCrossEntropyPartials";
constexpr char kFinish[] = "ShardedCrossEntropyFinish";

// Targets are read on the host only for CPU tensors (a device check would need a sync).
Status CheckTargets(const char* op, const Tensor& targets) {
  const int32_t* p = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (p[i] != kIgnoreIndex && p[i] < 0) {
      return InvalidArgumentError(StrCat(op, ": tensor 'targets': targets[", i, "] = ", p[i],
                                         " is neither a vocabulary id (>= 0) nor kIgnoreIndex (",
                                         kIgnoreIndex, ")"));
    }
  }
  return Status::Ok();
}

// Checks logits [N, Vl], targets [N] and the column range; returns N and Vl through the checker.
void CheckCommon(internal::OpChecker& chk, Context& ctx, const Tensor& logits,
                 const Tensor& targets, int64_t vocab_start, int64_t valid) {
  if (!chk.Ranked(logits, "logits", 2)) return;
  const Dim n{"N", logits.dim(0)}, v{"Vl", logits.dim(1)};
  chk.Expect(logits, "logits", {n, v}, internal::FloatDTypes(ctx), Layout::Contiguous());
  chk.Expect(targets, "targets", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Require(vocab_start >= 0, "vocab_start must be >= 0, found ", vocab_start);
  chk.Require(valid >= 0 && valid <= v.size, "valid must be in [0, Vl=", v.size, "], found ",
              valid);
}

}  // namespace

Status ShardedCrossEntropyPartials(Context& ctx, Tensor& partials, const Tensor& logits,
                                   const Tensor& targets, int64_t vocab_start, int64_t valid) {
  ProfileScope profile(ctx, "loss");
  internal::OpChecker chk(kPartials, ctx);
  CheckCommon(chk, ctx, logits, targets, vocab_start, valid);
  if (!chk.ok()) return chk.status();
  const int64_t rows = logits.dim(0), cols = logits.dim(1);
  chk.Expect(partials, "partials", {Dim{"N", rows}, Dim{"3", 3}}, {DType::kF32},
             Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (!ctx.is_cuda()) TANDEM_RETURN_IF_ERROR(CheckTargets(kPartials, targets));
  if (rows == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::ShardedCrossEntropyPartials(
        internal::StreamOf(ctx), logits.dtype(), partials.data<float>(), logits.raw_data(),
        targets.data<int32_t>(), rows, cols, vocab_start, valid);
    return internal::CudaResult(err, kPartials, ctx,
                                [&] { return internal::Describe("logits", logits); });
  }
#endif
  cpu::ShardedCrossEntropyPartials(partials.data<float>(), logits.data<float>(),
                                   targets.data<int32_t>(), rows, cols, vocab_start, valid,
                                   kIgnoreIndex);
  return Status::Ok();
}

Status ShardedCrossEntropyFinish(Context& ctx, Tensor& losses, Tensor& dlogits,
                                 const Tensor& logits, const Tensor& all_partials,
                                 const Tensor& targets, int64_t vocab_start, int64_t valid,
                                 float grad_scale) {
  ProfileScope profile(ctx, "loss");
  internal::OpChecker chk(kFinish, ctx);
  CheckCommon(chk, ctx, logits, targets, vocab_start, valid);
  if (!chk.ok() || !chk.Ranked(all_partials, "all_partials", 3)) return chk.status();
  const int64_t rows = logits.dim(0), cols = logits.dim(1), ranks = all_partials.dim(0);
  const Dim n{"N", rows};
  chk.Expect(all_partials, "all_partials", {Dim{"R", ranks}, n, Dim{"3", 3}}, {DType::kF32},
             Layout::Contiguous());
  chk.Expect(losses, "losses", {n}, {DType::kF32}, Layout::Contiguous());
  if (dlogits.defined()) {
    chk.Expect(dlogits, "dlogits", {n, Dim{"Vl", cols}}, {logits.dtype()}, Layout::Contiguous());
  }
  chk.Require(ranks > 0, "tensor 'all_partials': the number of ranks R must be > 0");
  chk.Require(std::isfinite(grad_scale), "grad_scale must be finite, found ", grad_scale);
  if (!chk.ok()) return chk.status();
  if (!ctx.is_cuda()) TANDEM_RETURN_IF_ERROR(CheckTargets(kFinish, targets));
  if (rows == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::ShardedCrossEntropyFinish(
        internal::StreamOf(ctx), logits.dtype(), losses.data<float>(),
        dlogits.defined() ? dlogits.raw_data() : nullptr, logits.raw_data(),
        all_partials.data<float>(), ranks, targets.data<int32_t>(), rows, cols, vocab_start, valid,
        grad_scale);
    return internal::CudaResult(err, kFinish, ctx,
                                [&] { return internal::Describe("logits", logits); });
  }
#endif
  cpu::ShardedCrossEntropyFinish(losses.data<float>(),
                                 dlogits.defined() ? dlogits.data<float>() : nullptr,
                                 logits.data<float>(), all_partials.data<float>(), ranks,
                                 targets.data<int32_t>(), rows, cols, vocab_start, valid,
                                 grad_scale, kIgnoreIndex);
  return Status::Ok();
}

}  // namespace tandem::ops
