// ops::Rope: validation and dispatch.
#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

Status ValidateRope(Context& ctx, const Tensor& y, const Tensor& x, const Tensor& positions,
                    const Tensor& inv_freq) {
  internal::OpChecker chk("Rope", ctx);
  if (!chk.Ranked(x, "x", 3)) return chk.status();
  const Dim n{"N", x.dim(0)}, h{"H", x.dim(1)}, d{"D", x.dim(2)};
  chk.Expect(x, "x", {n, h, d}, internal::FloatDTypes(ctx), Layout::TokenStrideFree());
  chk.Require(d.size % 2 == 0, "tensor 'x': head dim D must be even, found shape ",
              ShapeToString(x.shape()));
  chk.Expect(y, "y", {n, h, d}, {x.dtype()}, Layout::TokenStrideFree());
  chk.Expect(positions, "positions", {n}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(inv_freq, "inv_freq", {{"D/2", d.size / 2}}, {DType::kF32}, Layout::Contiguous());
  return chk.status();
}

}  // namespace

Status Rope(Context& ctx, Tensor& y, const Tensor& x, const Tensor& positions,
            const Tensor& inv_freq, bool inverse) {
  ProfileScope profile(ctx, "rope");
  if (Status s = ValidateRope(ctx, y, x, positions, inv_freq); !s.ok()) return s;
  const int64_t tokens = x.dim(0), heads = x.dim(1), head_dim = x.dim(2);
  if (x.numel() == 0) return Status::Ok();
  const int64_t xs = internal::LeadingStride(x, 0), ys = internal::LeadingStride(y, 0);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err = cuda::Rope(internal::StreamOf(ctx), x.dtype(), y.raw_data(), ys,
                                       x.raw_data(), xs, positions.data<int32_t>(),
                                       inv_freq.data<float>(), tokens, heads, head_dim, inverse);
    return internal::CudaResult(err, "Rope", ctx, [&] { return internal::Describe("x", x); });
  }
#endif
  cpu::Rope(y.data<float>(), ys, x.data<float>(), xs, positions.data<int32_t>(),
            inv_freq.data<float>(), tokens, heads, head_dim, inverse);
  return Status::Ok();
}

}  // namespace tandem::ops
