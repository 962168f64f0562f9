// ops::RmsNormForward / RmsNormBackward: validation and dispatch.
#include <cmath>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

Status ValidateForward(Context& ctx, const Tensor& y, const Tensor& rstd, const Tensor& x,
                       const Tensor& w, float eps) {
  internal::OpChecker chk("RmsNormForward", ctx);
  if (!chk.Ranked(x, "x", 2)) return chk.status();
  const Dim n{"N", x.dim(0)}, c{"C", x.dim(1)};
  chk.Expect(x, "x", {n, c}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
  chk.Expect(w, "w", {c}, {x.dtype()}, Layout::Contiguous());
  chk.Expect(y, "y", {n, c}, {x.dtype()}, Layout::RowStrideFree());
  if (rstd.defined()) chk.Expect(rstd, "rstd", {n}, {DType::kF32}, Layout::Contiguous());
  chk.Require(std::isfinite(eps) && eps >= 0.0f, "eps must be finite and >= 0, found ", eps);
  return chk.status();
}

Status ValidateBackward(Context& ctx, const Tensor& dx, const Tensor& dw, const Tensor& dy,
                        const Tensor& x, const Tensor& w, const Tensor& rstd) {
  internal::OpChecker chk("RmsNormBackward", ctx);
  if (!chk.Ranked(x, "x", 2)) return chk.status();
  const Dim n{"N", x.dim(0)}, c{"C", x.dim(1)};
  chk.Expect(x, "x", {n, c}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
  chk.Expect(dy, "dy", {n, c}, {x.dtype()}, Layout::RowStrideFree());
  chk.Expect(w, "w", {c}, {x.dtype()}, Layout::Contiguous());
  chk.Expect(rstd, "rstd", {n}, {DType::kF32}, Layout::Contiguous());
  chk.Expect(dx, "dx", {n, c}, {x.dtype()}, Layout::RowStrideFree());
  if (dw.defined()) chk.Expect(dw, "dw", {c}, {DType::kF32}, Layout::Contiguous());
  return chk.status();
}

}  // namespace

Status RmsNormForward(Context& ctx, Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w,
                      float eps) {
  ProfileScope profile(ctx, "norm");
  if (Status s = ValidateForward(ctx, y, rstd, x, w, eps); !s.ok()) return s;
  const int64_t rows = x.dim(0), cols = x.dim(1);
  if (rows == 0) return Status::Ok();
  const int64_t xs = internal::LeadingStride(x, 0), ys = internal::LeadingStride(y, 0);
  float* rstd_ptr = rstd.defined() ? rstd.data<float>() : nullptr;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::RmsNormForward(internal::StreamOf(ctx), x.dtype(), y.raw_data(), ys, rstd_ptr,
                             x.raw_data(), xs, w.raw_data(), rows, cols, eps);
    return internal::CudaResult(err, "RmsNormForward", ctx,
                                [&] { return internal::Describe("x", x); });
  }
#endif
  cpu::RmsNormForward(y.data<float>(), ys, rstd_ptr, x.data<float>(), xs, w.data<float>(), rows,
                      cols, eps);
  return Status::Ok();
}

Status AddRmsNormForward(Context& ctx, Tensor& sum, Tensor& y, const Tensor& a, const Tensor& b,
                         const Tensor& w, float eps) {
  ProfileScope profile(ctx, "norm");
  {
    internal::OpChecker chk("AddRmsNormForward", ctx);
    if (!chk.Ranked(a, "a", 2)) return chk.status();
    const Dim n{"N", a.dim(0)}, c{"C", a.dim(1)};
    chk.Expect(a, "a", {n, c}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
    chk.Expect(b, "b", {n, c}, {a.dtype()}, Layout::RowStrideFree());
    chk.Expect(sum, "sum", {n, c}, {a.dtype()}, Layout::RowStrideFree());
    chk.Expect(w, "w", {c}, {a.dtype()}, Layout::Contiguous());
    chk.Expect(y, "y", {n, c}, {a.dtype()}, Layout::RowStrideFree());
    chk.Require(std::isfinite(eps) && eps >= 0.0f, "eps must be finite and >= 0, found ", eps);
    if (!chk.ok()) return chk.status();
  }
  const int64_t rows = a.dim(0), cols = a.dim(1);
  if (rows == 0) return Status::Ok();
  const int64_t as = internal::LeadingStride(a, 0), bs = internal::LeadingStride(b, 0);
  const int64_t ss = internal::LeadingStride(sum, 0), ys = internal::LeadingStride(y, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::AddRmsNormForward(
        internal::StreamOf(ctx), a.dtype(), sum.raw_data(), ss, y.raw_data(), ys, a.raw_data(), as,
        b.raw_data(), bs, w.raw_data(), rows, cols, eps);
    return internal::CudaResult(err, "AddRmsNormForward", ctx,
                                [&] { return internal::Describe("a", a); });
  }
#endif
  // The reference: the two ops' loops (f32 on the host).
  for (int64_t r = 0; r < rows; ++r) {
    cpu::Add(DType::kF32, sum.data<float>() + r * ss, a.data<float>() + r * as,
             b.data<float>() + r * bs, cols);
  }
  cpu::RmsNormForward(y.data<float>(), ys, nullptr, sum.data<float>(), ss, w.data<float>(), rows,
                      cols, eps);
  return Status::Ok();
}

Status RmsNormBackward(Context& ctx, Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x,
                       const Tensor& w, const Tensor& rstd, bool accumulate_dx) {
  ProfileScope profile(ctx, "norm");
  if (Status s = ValidateBackward(ctx, dx, dw, dy, x, w, rstd); !s.ok()) return s;
  const int64_t rows = x.dim(0), cols = x.dim(1);
  if (rows == 0) return Status::Ok();
  const int64_t dxs = internal::LeadingStride(dx, 0), dys = internal::LeadingStride(dy, 0);
  const int64_t xs = internal::LeadingStride(x, 0);
  float* dw_ptr = dw.defined() ? dw.data<float>() : nullptr;
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const size_t bytes = cuda::RmsNormBackwardScratchBytes(rows, cols);
    StatusOr<Tensor> scratch = internal::AllocateScratch(ctx, bytes);
    if (!scratch.ok()) return scratch.status().WithContext("RmsNormBackward scratch");
    const cudaError_t err = cuda::RmsNormBackward(internal::StreamOf(ctx), x.dtype(), dx.raw_data(),
                                                  dxs, dw_ptr, dy.raw_data(), dys, x.raw_data(), xs,
                                                  w.raw_data(), rstd.data<float>(), rows, cols,
                                                  accumulate_dx, scratch->raw_data(), bytes);
    return internal::CudaResult(err, "RmsNormBackward", ctx,
                                [&] { return internal::Describe("x", x); });
  }
#endif
  cpu::RmsNormBackward(dx.data<float>(), dxs, dw_ptr, dy.data<float>(), dys, x.data<float>(), xs,
                       w.data<float>(), rstd.data<float>(), rows, cols, accumulate_dx);
  return Status::Ok();
}

}  // namespace tandem::ops
