// ops::AdamW: validation and dispatch.
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

constexpr char kOp[] = "AdamW";

Status Validate(Context& ctx, const Tensor& master, const Tensor& m, const Tensor& v,
                const Tensor& model_weights, const Tensor& grad, const AdamWParams& p) {
  internal::OpChecker chk(kOp, ctx);
  const internal::DTypeSet f32{DType::kF32};
  if (!chk.ExpectContiguous(master, "master", f32)) return chk.status();
  const int64_t n = master.numel();
  auto same_numel = [&](const Tensor& t, const char* name) {
    return chk.Require(t.numel() == n, "tensor '", name, "': expected numel ", n, " (as 'master' ",
                       ShapeToString(master.shape()), "), found shape ", ShapeToString(t.shape()));
  };
  chk.ExpectContiguous(m, "m", f32) && same_numel(m, "m");
  chk.ExpectContiguous(v, "v", f32) && same_numel(v, "v");
  chk.ExpectContiguous(grad, "grad", f32) && same_numel(grad, "grad");
  if (model_weights.defined()) {
    chk.ExpectContiguous(model_weights, "model_weights", {DType::kF32, DType::kBF16}) &&
        same_numel(model_weights, "model_weights");
  }
  chk.Require(p.step >= 1, "params.step is 1-based, found ", p.step);
  chk.Require(std::isfinite(p.lr) && std::isfinite(p.eps) && std::isfinite(p.weight_decay) &&
                  std::isfinite(p.grad_scale),
              "params lr, eps, weight_decay and grad_scale must be finite, found lr=", p.lr,
              " eps=", p.eps, " weight_decay=", p.weight_decay, " grad_scale=", p.grad_scale);
  chk.Require(p.beta1 >= 0.0f && p.beta1 < 1.0f && p.beta2 >= 0.0f && p.beta2 < 1.0f,
              "params beta1 and beta2 must lie in [0, 1), found ", p.beta1, " and ", p.beta2);
  return chk.status();
}

}  // namespace

Status AdamW(Context& ctx, Tensor& master, Tensor& m, Tensor& v, Tensor& model_weights,
             const Tensor& grad, const AdamWParams& p) {
  ProfileScope profile(ctx, "optimizer");
  if (Status s = Validate(ctx, master, m, v, model_weights, grad, p); !s.ok()) return s;
  const int64_t n = master.numel();
  if (n == 0) return Status::Ok();
  void* weights = model_weights.defined() ? model_weights.raw_data() : nullptr;
  const DType weights_dtype = model_weights.defined() ? model_weights.dtype() : DType::kF32;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::AdamW(internal::StreamOf(ctx), master.data<float>(), m.data<float>(), v.data<float>(),
                    weights, weights_dtype, grad.data<float>(), n, p.lr, p.beta1, p.beta2, p.eps,
                    p.weight_decay, p.step, p.grad_scale);
    return internal::CudaResult(err, kOp, ctx,
                                [&] { return internal::Describe("master", master); });
  }
#endif
  cpu::AdamW(master.data<float>(), m.data<float>(), v.data<float>(), weights, weights_dtype,
             grad.data<float>(), n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, p.step,
             p.grad_scale);
  return Status::Ok();
}

}  // namespace tandem::ops
