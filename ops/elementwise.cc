// ops::SumSquares, Add, Cast, Fill, Scale, CopyMatrix(es): validation and dispatch. Unlike the
// other ops these take every floating dtype (f32, bf16, f16) on both CPU and CUDA (Fill: every
// dtype): they are the glue for gradients, norms and dtype conversion, not compute.
#include <algorithm>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/multi_tensor.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::DTypeSet;
using internal::Layout;

constexpr DTypeSet kAllFloats{DType::kF32, DType::kBF16, DType::kF16};
constexpr DTypeSet kAllDTypes{DType::kF32, DType::kBF16, DType::kF16,
                              DType::kI32, DType::kI64,  DType::kU8};

bool RequireSameShape(internal::OpChecker& chk, const Tensor& t, const char* name,
                      const Tensor& ref, const char* ref_name) {
  return chk.Require(t.shape() == ref.shape(), "tensor '", name, "': expected shape ",
                     ShapeToString(ref.shape()), " (as '", ref_name, "'), found ",
                     ShapeToString(t.shape()));
}

#ifdef TANDEM_WITH_CUDA
Status Launched(cudaError_t err, const char* op, Context& ctx, const char* name, const Tensor& t) {
  return internal::CudaResult(err, op, ctx, [&] { return internal::Describe(name, t); });
}
#endif

}  // namespace

Status SumSquares(Context& ctx, Tensor& out, const Tensor& x) {
  ProfileScope profile(ctx, "optimizer");
  internal::OpChecker chk("SumSquares", ctx);
  chk.ExpectContiguous(x, "x", kAllFloats);
  chk.Expect(out, "out", {{"1", 1}}, {DType::kF32}, Layout::Contiguous());
  if (!chk.ok()) return chk.status();
  if (x.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const size_t bytes = cuda::SumSquaresScratchBytes(x.numel());
    StatusOr<Tensor> scratch = internal::AllocateScratch(ctx, bytes);
    if (!scratch.ok()) return scratch.status().WithContext("SumSquares scratch");
    return Launched(cuda::SumSquares(internal::StreamOf(ctx), x.dtype(), out.data<float>(),
                                     x.raw_data(), x.numel(), scratch->raw_data(), bytes),
                    "SumSquares", ctx, "x", x);
  }
#endif
  cpu::SumSquares(out.data<float>(), x.dtype(), x.raw_data(), x.numel());
  return Status::Ok();
}

Status SumSquaresMulti(Context& ctx, Tensor& out, std::span<const Tensor> xs) {
  ProfileScope profile(ctx, "optimizer");
  {
    internal::OpChecker chk("SumSquaresMulti", ctx);
    chk.Expect(out, "out", {{"1", 1}}, {DType::kF32}, Layout::Contiguous());
    for (size_t i = 0; i < xs.size() && chk.ok(); ++i) {
      const std::string name = StrCat("xs[", i, "]");
      chk.ExpectContiguous(xs[i], name.c_str(), kAllFloats);
    }
    if (!chk.ok()) return chk.status();
  }
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    // Runs of consecutive tensors of one dtype, in order (the totals add up in list order).
    std::vector<const void*> ptrs;
    std::vector<int64_t> ns;
    for (const Tensor& x : xs) {
      ptrs.push_back(x.raw_data());
      ns.push_back(x.numel());
    }
    const size_t bytes = cuda::SumSquaresMultiScratchBytes(ns.data(), static_cast<int>(ns.size()));
    if (bytes == 0) return Status::Ok();
    StatusOr<Tensor> scratch = internal::AllocateScratch(ctx, bytes);
    if (!scratch.ok()) return scratch.status().WithContext("SumSquaresMulti scratch");
    for (size_t first = 0; first < xs.size();) {
      size_t end = first + 1;
      while (end < xs.size() && xs[end].dtype() == xs[first].dtype()) ++end;
      const cudaError_t err = cuda::SumSquaresMulti(
          internal::StreamOf(ctx), xs[first].dtype(), out.data<float>(), ptrs.data() + first,
          ns.data() + first, static_cast<int>(end - first), scratch->raw_data(), bytes);
      if (err != cudaSuccess) return Launched(err, "SumSquaresMulti", ctx, "xs[0]", xs[first]);
      first = end;
    }
    return Status::Ok();
  }
#endif
  for (const Tensor& x : xs) {
    if (x.numel() > 0) cpu::SumSquares(out.data<float>(), x.dtype(), x.raw_data(), x.numel());
  }
  return Status::Ok();
}

Status Add(Context& ctx, Tensor& out, const Tensor& a, const Tensor& b) {
  ProfileScope profile(ctx, "elementwise");
  internal::OpChecker chk("Add", ctx);
  chk.ExpectContiguous(a, "a", kAllFloats);
  chk.ExpectContiguous(b, "b", {a.dtype()}) && RequireSameShape(chk, b, "b", a, "a");
  chk.ExpectContiguous(out, "out", {a.dtype()}) && RequireSameShape(chk, out, "out", a, "a");
  if (!chk.ok()) return chk.status();
  if (a.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    return Launched(cuda::Add(internal::StreamOf(ctx), a.dtype(), out.raw_data(), a.raw_data(),
                              b.raw_data(), a.numel()),
                    "Add", ctx, "a", a);
  }
#endif
  cpu::Add(a.dtype(), out.raw_data(), a.raw_data(), b.raw_data(), a.numel());
  return Status::Ok();
}

Status Cast(Context& ctx, Tensor& out, const Tensor& in) {
  ProfileScope profile(ctx, "elementwise");
  internal::OpChecker chk("Cast", ctx);
  chk.ExpectContiguous(in, "in", kAllFloats);
  chk.ExpectContiguous(out, "out", kAllFloats) && RequireSameShape(chk, out, "out", in, "in");
  if (!chk.ok()) return chk.status();
  if (in.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    return Launched(cuda::Cast(internal::StreamOf(ctx), out.dtype(), out.raw_data(), in.dtype(),
                               in.raw_data(), in.numel()),
                    "Cast", ctx, "in", in);
  }
#endif
  cpu::Cast(out.dtype(), out.raw_data(), in.dtype(), in.raw_data(), in.numel());
  return Status::Ok();
}

Status Fill(Context& ctx, Tensor& out, float value) {
  ProfileScope profile(ctx, "elementwise");
  internal::OpChecker chk("Fill", ctx);
  if (!chk.ExpectContiguous(out, "out", kAllDTypes)) return chk.status();
  if (out.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    return Launched(
        cuda::Fill(internal::StreamOf(ctx), out.dtype(), out.raw_data(), value, out.numel()),
        "Fill", ctx, "out", out);
  }
#endif
  cpu::Fill(out.dtype(), out.raw_data(), value, out.numel());
  return Status::Ok();
}

Status Scale(Context& ctx, Tensor& x, float s) {
  ProfileScope profile(ctx, "elementwise");
  internal::OpChecker chk("Scale", ctx);
  if (!chk.ExpectContiguous(x, "x", kAllFloats)) return chk.status();
  if (x.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    return Launched(cuda::Scale(internal::StreamOf(ctx), x.dtype(), x.raw_data(), s, x.numel()),
                    "Scale", ctx, "x", x);
  }
#endif
  cpu::Scale(x.dtype(), x.raw_data(), s, x.numel());
  return Status::Ok();
}

namespace {

// One CopyMatrix pair checked; its rows, bytes per row and pitches.
struct MatrixCopy {
  int64_t rows = 0;
  size_t row_bytes = 0, dst_pitch = 0, src_pitch = 0;
};

StatusOr<MatrixCopy> CheckMatrixCopy(Context& ctx, const char* op, const Tensor& dst,
                                     const Tensor& src) {
  internal::OpChecker chk(op, ctx);
  if (!chk.Ranked(src, "src", 2)) return chk.status();
  const int64_t rows = src.dim(0), cols = src.dim(1);
  chk.Expect(src, "src", {{"rows", rows}, {"cols", cols}}, kAllDTypes, Layout::RowStrideFree());
  chk.Expect(dst, "dst", {{"rows", rows}, {"cols", cols}}, {src.dtype()}, Layout::RowStrideFree());
  if (!chk.ok()) return chk.status();
  const size_t elem = DTypeSize(src.dtype());
  MatrixCopy m;
  m.rows = rows;
  m.row_bytes = static_cast<size_t>(cols) * elem;
  m.dst_pitch = static_cast<size_t>(rows > 1 ? dst.stride(0) : cols) * elem;
  m.src_pitch = static_cast<size_t>(rows > 1 ? src.stride(0) : cols) * elem;
  return m;
}

void CopyMatrixOnHost(const MatrixCopy& m, void* dst, const void* src) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  for (int64_t r = 0; r < m.rows; ++r) {
    std::memmove(d + r * m.dst_pitch, s + r * m.src_pitch, m.row_bytes);
  }
}

// CopyMatrices under the name `op` (errors name it, and the pair when there are several).
Status CopyPairs(Context& ctx, const char* op, std::span<Tensor> dst, std::span<const Tensor> src) {
  ProfileScope profile(ctx, "elementwise");
  if (dst.size() != src.size()) {
    return InvalidArgumentError(
        StrCat(op, ": ", dst.size(), " destinations for ", src.size(), " sources"));
  }
  std::vector<MatrixCopy> copies;
  for (size_t i = 0; i < src.size(); ++i) {
    StatusOr<MatrixCopy> m = CheckMatrixCopy(ctx, op, dst[i], src[i]);
    if (!m.ok()) {
      if (src.size() == 1) return m.status();
      return InvalidArgumentError(StrCat("pair ", i, ": ", m.status().message()));
    }
    copies.push_back(*m);
  }
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    // Narrow rows (a LoRA factor's columns of a wide matrix) through one kernel launch per
    // kCopyRowsBatch of them; wide rows through cudaMemcpy2DAsync.
    std::vector<cuda::CopyRowsEntry> narrow;
    for (size_t i = 0; i < copies.size(); ++i) {
      const MatrixCopy& m = copies[i];
      if (m.rows == 0 || m.row_bytes == 0) continue;
      if (m.row_bytes < 512) {
        narrow.push_back({dst[i].raw_data(), src[i].raw_data(), static_cast<int64_t>(m.dst_pitch),
                          static_cast<int64_t>(m.src_pitch), static_cast<int64_t>(m.row_bytes),
                          m.rows});
        continue;
      }
      TANDEM_RETURN_IF_ERROR(
          Launched(cudaMemcpy2DAsync(dst[i].raw_data(), m.dst_pitch, src[i].raw_data(), m.src_pitch,
                                     m.row_bytes, static_cast<size_t>(m.rows),
                                     cudaMemcpyDeviceToDevice, internal::StreamOf(ctx)),
                   op, ctx, "src", src[i]));
    }
    for (size_t i = 0; i < narrow.size(); i += cuda::kCopyRowsBatch) {
      const int n = static_cast<int>(std::min<size_t>(cuda::kCopyRowsBatch, narrow.size() - i));
      TANDEM_RETURN_IF_ERROR(
          Launched(cuda::CopyRowsBytesBatch(internal::StreamOf(ctx), narrow.data() + i, n), op, ctx,
                   "src", src[0]));
    }
    return Status::Ok();
  }
#endif
  for (size_t i = 0; i < copies.size(); ++i) {
    CopyMatrixOnHost(copies[i], dst[i].raw_data(), src[i].raw_data());
  }
  return Status::Ok();
}

}  // namespace

Status CopyMatrices(Context& ctx, std::span<Tensor> dst, std::span<const Tensor> src) {
  return CopyPairs(ctx, "CopyMatrices", dst, src);
}

Status CopyMatrix(Context& ctx, Tensor& dst, const Tensor& src) {
  return CopyPairs(ctx, "CopyMatrix", std::span<Tensor>(&dst, 1), std::span<const Tensor>(&src, 1));
}

}  // namespace tandem::ops
