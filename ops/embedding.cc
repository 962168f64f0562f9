// ops::EmbeddingForward / EmbeddingBackward: validation and dispatch.
#include "ops/cpu/kernels.h"
#include "ops/internal/op_util.h"
#include "ops/ops.h"
#include "ops/profiler.h"

namespace tandem::ops {
namespace {

using internal::Layout;

// Ids are read on the host only for CPU tensors; the CUDA kernels guard their own loads.
Status CheckIdsInRange(const char* op, const Tensor& ids, int64_t vocab) {
  const int32_t* p = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (p[i] < 0 || p[i] >= vocab) {
      return InvalidArgumentError(StrCat(op, ": tensor 'ids': ids[", i, "] = ", p[i],
                                         " is out of range [0, V=", vocab, ")"));
    }
  }
  return Status::Ok();
}

Status ValidateForward(Context& ctx, const Tensor& out, const Tensor& ids, const Tensor& table) {
  internal::OpChecker chk("EmbeddingForward", ctx);
  if (!chk.Ranked(ids, "ids", 1) || !chk.Ranked(table, "table", 2)) return chk.status();
  const int64_t n = ids.dim(0), v = table.dim(0), c = table.dim(1);
  chk.Expect(ids, "ids", {{"N", n}}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(table, "table", {{"V", v}, {"C", c}}, internal::FloatDTypes(ctx),
             Layout::Contiguous());
  chk.Expect(out, "out", {{"N", n}, {"C", c}}, {table.dtype()}, Layout::Contiguous());
  if (!chk.ok() || ctx.is_cuda()) return chk.status();
  return CheckIdsInRange("EmbeddingForward", ids, v);
}

Status ValidateBackward(Context& ctx, const Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  internal::OpChecker chk("EmbeddingBackward", ctx);
  if (!chk.Ranked(ids, "ids", 1) || !chk.Ranked(dout, "dout", 2)) return chk.status();
  const int64_t n = ids.dim(0), c = dout.dim(1);
  chk.Expect(ids, "ids", {{"N", n}}, {DType::kI32}, Layout::Contiguous());
  chk.Expect(dout, "dout", {{"N", n}, {"C", c}}, internal::FloatDTypes(ctx), Layout::Contiguous());
  if (!dtable.defined() || !chk.Ranked(dtable, "dtable", 2)) return chk.status();
  const int64_t v = dtable.dim(0);
  chk.Expect(dtable, "dtable", {{"V", v}, {"C", c}}, {DType::kF32}, Layout::Contiguous());
  if (!chk.ok() || ctx.is_cuda()) return chk.status();
  return CheckIdsInRange("EmbeddingBackward", ids, v);
}

}  // namespace

Status EmbeddingForward(Context& ctx, Tensor& out, const Tensor& ids, const Tensor& table) {
  ProfileScope profile(ctx, "embedding");
  if (Status s = ValidateForward(ctx, out, ids, table); !s.ok()) return s;
  const int64_t n = ids.dim(0), v = table.dim(0), c = table.dim(1);
  if (out.numel() == 0) return Status::Ok();
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const cudaError_t err =
        cuda::EmbeddingForward(internal::StreamOf(ctx), table.dtype(), out.raw_data(),
                               ids.data<int32_t>(), table.raw_data(), n, v, c);
    return internal::CudaResult(err, "EmbeddingForward", ctx, [&] {
      return StrCat(internal::Describe("ids", ids), ", ", internal::Describe("table", table));
    });
  }
#endif
  (void)v;
  cpu::EmbeddingForward(out.data<float>(), ids.data<int32_t>(), table.data<float>(), n, c);
  return Status::Ok();
}

Status EmbeddingBackward(Context& ctx, Tensor& dtable, const Tensor& dout, const Tensor& ids) {
  ProfileScope profile(ctx, "embedding");
  if (Status s = ValidateBackward(ctx, dtable, dout, ids); !s.ok()) return s;
  if (!dtable.defined() || dout.numel() == 0) return Status::Ok();  // frozen table, or no tokens
  const int64_t n = ids.dim(0), v = dtable.dim(0), c = dtable.dim(1);
#ifdef TANDEM_WITH_CUDA
  if (ctx.is_cuda()) {
    const size_t bytes = cuda::EmbeddingBackwardScratchBytes(n);
    StatusOr<Tensor> scratch = internal::AllocateScratch(ctx, bytes);
    if (!scratch.ok()) return scratch.status().WithContext("EmbeddingBackward scratch");
    const cudaError_t err = cuda::EmbeddingBackward(
        internal::StreamOf(ctx), dout.dtype(), dtable.data<float>(), dout.raw_data(),
        ids.data<int32_t>(), n, v, c, scratch->raw_data(), bytes);
    return internal::CudaResult(err, "EmbeddingBackward", ctx, [&] {
      return StrCat(internal::Describe("dout", dout), ", ", internal::Describe("dtable", dtable));
    });
  }
#endif
  cpu::EmbeddingBackward(dtable.data<float>(), dout.data<float>(), ids.data<int32_t>(), n, v, c);
  return Status::Ok();
}

}  // namespace tandem::ops
