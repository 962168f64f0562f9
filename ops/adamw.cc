// ops::AdamW: validation and dispatch.
#include <cmath>
#include <map>
#include <span>
#include <vector>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/internal/stochastic_round.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

constexpr char kOp[] = "AdamW";

// The update's hyperparameters (both AdamW forms).
void CheckParams(internal::OpChecker& chk, const AdamWParams& p) {
  chk.Require(p.step >= 1, "params.step is 1-based, found ", p.step);
  chk.Require(std::isfinite(p.lr) && std::isfinite(p.eps) && std::isfinite(p.weight_decay) &&
                  std::isfinite(p.grad_scale),
              "params lr, eps, weight_decay and grad_scale must be finite, found lr=", p.lr,
              " eps=", p.eps, " weight_decay=", p.weight_decay, " grad_scale=", p.grad_scale);
  chk.Require(p.beta1 >= 0.0f && p.beta1 < 1.0f && p.beta2 >= 0.0f && p.beta2 < 1.0f,
              "params beta1 and beta2 must lie in [0, 1), found ", p.beta1, " and ", p.beta2);
}

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
  CheckParams(chk, p);
  return chk.status();
}

Status ValidateBf16State(Context& ctx, const AdamWBf16Tensors& e, const AdamWParams& p) {
  if (e.param == nullptr || e.m == nullptr || e.v == nullptr || e.grad == nullptr) {
    return InvalidArgumentError("param, m, v and grad must all be given");
  }
  internal::OpChecker chk("AdamWBf16", ctx);
  if (!chk.ExpectContiguous(*e.param, "param", {DType::kF32, DType::kBF16})) return chk.status();
  const int64_t n = e.param->numel();
  auto same_numel = [&](const Tensor& t, const char* name) {
    return chk.Require(t.numel() == n, "tensor '", name, "': expected numel ", n, " (as 'param' ",
                       ShapeToString(e.param->shape()), "), found shape ",
                       ShapeToString(t.shape()));
  };
  const internal::DTypeSet bf16{DType::kBF16};
  chk.ExpectContiguous(*e.m, "m", bf16) && same_numel(*e.m, "m");
  chk.ExpectContiguous(*e.v, "v", bf16) && same_numel(*e.v, "v");
  chk.ExpectContiguous(*e.grad, "grad", {DType::kF32}) && same_numel(*e.grad, "grad");
  AdamWParams q = p;
  q.weight_decay = e.weight_decay;
  CheckParams(chk, q);
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

Status AdamWMulti(Context& ctx, std::span<const AdamWTensors> entries, const AdamWParams& params) {
  ProfileScope profile(ctx, "optimizer");
  std::vector<Tensor> no_weights(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const AdamWTensors& e = entries[i];
    if (e.master == nullptr || e.m == nullptr || e.v == nullptr || e.grad == nullptr) {
      return InvalidArgumentError(
          StrCat("AdamWMulti: entry ", i, ": master, m, v and grad must all be given"));
    }
    AdamWParams p = params;
    p.weight_decay = e.weight_decay;
    const Tensor& weights = e.model_weights != nullptr ? *e.model_weights : no_weights[i];
    if (Status s = Validate(ctx, *e.master, *e.m, *e.v, weights, *e.grad, p); !s.ok()) {
      return s.WithContext(StrCat("AdamWMulti entry ", i));
    }
  }
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    // One launch group per model-weights dtype (entries without model weights join the f32
    // group); elementwise, so the grouping changes no value.
    std::map<DType, std::vector<cuda::AdamWMultiArgs>> groups;
    for (const AdamWTensors& e : entries) {
      const bool has = e.model_weights != nullptr && e.model_weights->defined();
      groups[has ? e.model_weights->dtype() : DType::kF32].push_back(
          {e.master->data<float>(), e.m->data<float>(), e.v->data<float>(),
           has ? e.model_weights->raw_data() : nullptr, e.grad->data<float>(), e.master->numel(),
           e.weight_decay});
    }
    for (const auto& [dtype, args] : groups) {
      const cudaError_t err = cuda::AdamWMulti(
          internal::StreamOf(ctx), args.data(), static_cast<int>(args.size()), dtype, params.lr,
          params.beta1, params.beta2, params.eps, params.step, params.grad_scale);
      if (err != cudaSuccess) {
        return internal::CudaResult(err, "AdamWMulti", ctx, [&] {
          return StrCat(args.size(), " entries with ", DTypeName(dtype), " model weights");
        });
      }
    }
    return Status::Ok();
  }
#endif
  for (size_t i = 0; i < entries.size(); ++i) {  // the reference: one AdamW per entry
    const AdamWTensors& e = entries[i];
    AdamWParams p = params;
    p.weight_decay = e.weight_decay;
    Tensor& weights = e.model_weights != nullptr ? *e.model_weights : no_weights[i];
    TANDEM_RETURN_IF_ERROR(AdamW(ctx, *e.master, *e.m, *e.v, weights, *e.grad, p));
  }
  return Status::Ok();
}

uint64_t AdamWNoiseKey(uint64_t seed, int64_t step, uint64_t tensor) {
  return internal::NoiseKey(seed, step, tensor);
}

Status AdamWBf16Multi(Context& ctx, std::span<const AdamWBf16Tensors> entries,
                      const AdamWParams& params) {
  ProfileScope profile(ctx, "optimizer");
  for (size_t i = 0; i < entries.size(); ++i) {
    if (Status s = ValidateBf16State(ctx, entries[i], params); !s.ok()) {
      return s.WithContext(StrCat("AdamWBf16Multi entry ", i));
    }
  }
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    // One launch group per parameter dtype; elementwise, so the grouping changes no value.
    std::map<DType, std::vector<cuda::AdamWBf16Args>> groups;
    for (const AdamWBf16Tensors& e : entries) {
      groups[e.param->dtype()].push_back(
          {e.param->raw_data(), static_cast<uint16_t*>(e.m->raw_data()),
           static_cast<uint16_t*>(e.v->raw_data()), e.grad->data<float>(), e.param->numel(),
           e.weight_decay, e.noise_key});
    }
    for (const auto& [dtype, args] : groups) {
      const cudaError_t err = cuda::AdamWBf16Multi(
          internal::StreamOf(ctx), args.data(), static_cast<int>(args.size()), dtype, params.lr,
          params.beta1, params.beta2, params.eps, params.step, params.grad_scale);
      if (err != cudaSuccess) {
        return internal::CudaResult(err, "AdamWBf16Multi", ctx, [&] {
          return StrCat(args.size(), " entries with ", DTypeName(dtype), " parameters");
        });
      }
    }
    return Status::Ok();
  }
#endif
  for (const AdamWBf16Tensors& e : entries) {  // the reference, one tensor at a time
    cpu::AdamWBf16State(e.param->raw_data(), e.param->dtype(), e.m->data<Bf16>(), e.v->data<Bf16>(),
                        e.grad->data<float>(), e.param->numel(), params.lr, params.beta1,
                        params.beta2, params.eps, e.weight_decay, params.step, params.grad_scale,
                        e.noise_key);
  }
  return Status::Ok();
}

}  // namespace tandem::ops
