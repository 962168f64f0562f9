// ops::SwigluForward / SwigluBackward: validation and dispatch.
#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;
using internal::LeadingStride;

// Checks gate (which sets N, F and the dtype) and then every other [N, F] operand.
Status Validate(Context& ctx, const char* op, const Tensor& gate,
                std::initializer_list<std::pair<const Tensor*, const char*>> others) {
  internal::OpChecker chk(op, ctx);
  if (!chk.Ranked(gate, "gate", 2)) return chk.status();
  const Dim n{"N", gate.dim(0)}, f{"F", gate.dim(1)};
  chk.Expect(gate, "gate", {n, f}, internal::FloatDTypes(ctx), Layout::RowStrideFree());
  for (const auto& [t, name] : others) {
    chk.Expect(*t, name, {n, f}, {gate.dtype()}, Layout::RowStrideFree());
  }
  return chk.status();
}

}  // namespace

Status SwigluForward(Context& ctx, Tensor& out, const Tensor& gate, const Tensor& up) {
  ProfileScope profile(ctx, "swiglu");
  if (Status s = Validate(ctx, "SwigluForward", gate, {{&up, "up"}, {&out, "out"}}); !s.ok()) {
    return s;
  }
  const int64_t rows = gate.dim(0), cols = gate.dim(1);
  if (gate.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::SwigluForward(
        internal::StreamOf(ctx), gate.dtype(), out.raw_data(), LeadingStride(out, 0),
        gate.raw_data(), LeadingStride(gate, 0), up.raw_data(), LeadingStride(up, 0), rows, cols);
    return internal::CudaResult(err, "SwigluForward", ctx,
                                [&] { return internal::Describe("gate", gate); });
  }
#endif
  cpu::SwigluForward(out.data<float>(), LeadingStride(out, 0), gate.data<float>(),
                     LeadingStride(gate, 0), up.data<float>(), LeadingStride(up, 0), rows, cols);
  return Status::Ok();
}

Status SwigluBackward(Context& ctx, Tensor& dgate, Tensor& dup, const Tensor& dout,
                      const Tensor& gate, const Tensor& up) {
  ProfileScope profile(ctx, "swiglu");
  if (Status s = Validate(ctx, "SwigluBackward", gate,
                          {{&up, "up"}, {&dout, "dout"}, {&dgate, "dgate"}, {&dup, "dup"}});
      !s.ok()) {
    return s;
  }
  const int64_t rows = gate.dim(0), cols = gate.dim(1);
  if (gate.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::SwigluBackward(
        internal::StreamOf(ctx), gate.dtype(), dgate.raw_data(), LeadingStride(dgate, 0),
        dup.raw_data(), LeadingStride(dup, 0), dout.raw_data(), LeadingStride(dout, 0),
        gate.raw_data(), LeadingStride(gate, 0), up.raw_data(), LeadingStride(up, 0), rows, cols);
    return internal::CudaResult(err, "SwigluBackward", ctx,
                                [&] { return internal::Describe("gate", gate); });
  }
#endif
  cpu::SwigluBackward(dgate.data<float>(), LeadingStride(dgate, 0), dup.data<float>(),
                      LeadingStride(dup, 0), dout.data<float>(), LeadingStride(dout, 0),
                      gate.data<float>(), LeadingStride(gate, 0), up.data<float>(),
                      LeadingStride(up, 0), rows, cols);
  return Status::Ok();
}

}  // namespace tandem::ops
