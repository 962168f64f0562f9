// ops::Matmul: validation, then OpenBLAS (CPU) or cuBLASLt (CUDA).
#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Dim;
using internal::Layout;

constexpr char kOp[] = "Matmul";

struct GemmDims {
  int64_t m, n, k;
};

StatusOr<GemmDims> ValidateMatmul(Context& ctx, const Tensor& c, const Tensor& a, const Tensor& b,
                                  bool trans_a, bool trans_b) {
  internal::OpChecker chk(kOp, ctx);
  if (!chk.Ranked(a, "a", 2) || !chk.Ranked(b, "b", 2) || !chk.Ranked(c, "c", 2)) {
    return chk.status();
  }
  const int64_t m = trans_a ? a.dim(1) : a.dim(0);
  const int64_t k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  const Dim dm{"M", m}, dn{"N", n}, dk{"K", k};
  const internal::DTypeSet floats = internal::FloatDTypes(ctx);
  const Layout rows = Layout::RowStrideFree();
  chk.Expect(a, "a", {trans_a ? dk : dm, trans_a ? dm : dk}, floats, rows);
  chk.Expect(b, "b", {trans_b ? dn : dk, trans_b ? dk : dn}, {a.dtype()}, rows);
  chk.Expect(c, "c", {dm, dn}, floats, rows);
  if (!chk.ok()) return chk.status();
  return GemmDims{m, n, k};
}

#ifdef TANDEM_WITH_CUDA
// c = beta * c on the device, row by row when c is a strided view (only for K == 0).
Status ScaleRowsCuda(Context& ctx, Tensor& c, float beta) {
  const int64_t ldc = internal::LeadingStride(c, 0);
  const bool packed = ldc == c.dim(1) || c.dim(0) <= 1;
  const int64_t rows = packed ? 1 : c.dim(0), row_elems = packed ? c.numel() : c.dim(1);
  const size_t elem = DTypeSize(c.dtype());
  for (int64_t i = 0; i < rows; ++i) {
    void* row = static_cast<char*>(c.raw_data()) + i * ldc * elem;
    const cudaError_t err =
        beta == 0.0f ? cuda::Fill(internal::StreamOf(ctx), c.dtype(), row, 0.0f, row_elems)
                     : cuda::Scale(internal::StreamOf(ctx), c.dtype(), row, beta, row_elems);
    TANDEM_RETURN_IF_ERROR(internal::CudaResult(
        err, kOp, ctx, [&] { return StrCat("K=0, ", internal::Describe("c", c)); }));
  }
  return Status::Ok();
}

Status MatmulCuda(Context& ctx, Tensor& c, const Tensor& a, const Tensor& b, bool trans_a,
                  bool trans_b, float alpha, float beta, const GemmDims& d) {
  if (d.k == 0) return beta == 1.0f ? Status::Ok() : ScaleRowsCuda(ctx, c, beta);
  const std::string err = cuda::Gemm(
      *ctx.cuda()->gemm, internal::StreamOf(ctx), a.dtype(), c.dtype(), c.raw_data(),
      internal::LeadingStride(c, 0), a.raw_data(), internal::LeadingStride(a, 0), b.raw_data(),
      internal::LeadingStride(b, 0), d.m, d.n, d.k, trans_a, trans_b, alpha, beta);
  if (err.empty()) return Status::Ok();
  return InternalError(StrCat(kOp, " on ", ctx.device().ToString(), " (M=", d.m, ", N=", d.n,
                              ", K=", d.k, ", trans_a=", trans_a, ", trans_b=", trans_b, ", ",
                              internal::Describe("a", a), ", ", internal::Describe("b", b), ", ",
                              internal::Describe("c", c), "): ", err));
}
#endif

}  // namespace

Status Matmul(Context& ctx, Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b,
              float alpha, float beta) {
  ProfileScope profile(ctx, "gemm");
  const StatusOr<GemmDims> dims = ValidateMatmul(ctx, c, a, b, trans_a, trans_b);
  if (!dims.ok()) return dims.status();
  const GemmDims& d = *dims;
  if (d.m == 0 || d.n == 0) return Status::Ok();
  if (profile.active()) {
    profile.AddFlops(2.0 * static_cast<double>(d.m) * static_cast<double>(d.n) *
                     static_cast<double>(d.k));
  }
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) return MatmulCuda(ctx, c, a, b, trans_a, trans_b, alpha, beta, d);
#endif
  cpu::Gemm(c.data<float>(), internal::LeadingStride(c, 0), a.data<float>(),
            internal::LeadingStride(a, 0), b.data<float>(), internal::LeadingStride(b, 0), d.m, d.n,
            d.k, trans_a, trans_b, alpha, beta);
  return Status::Ok();
}

}  // namespace tandem::ops
