// Validation and dispatch helpers shared by the public ops (ops/*.cc). Private to ops/.
//
// Each op validates once with an OpChecker, which records the first failure as InvalidArgument
// "Op: tensor 'name': expected ..., found ...", then dispatches to ops::cpu (ops/cpu/kernels.h)
// or, in CUDA builds, to ops::cuda (ops/internal/cuda_kernels.h).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/status.h"
#include "core/tensor.h"
#include "ops/context.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>

#include "ops/internal/cuda_resources.h"
#endif

namespace tandem::ops::internal {

// One named dimension of an expected shape: printed as "C=96".
struct Dim {
  const char* name;
  int64_t size;
};

// A small set of dtypes, printed as "f32 or bf16".
class DTypeSet {
 public:
  constexpr DTypeSet(std::initializer_list<DType> dtypes) {
    for (DType d : dtypes) bits_ |= 1u << static_cast<int>(d);
  }
  bool Contains(DType dtype) const { return (bits_ >> static_cast<int>(dtype)) & 1u; }
  std::string ToString() const;

 private:
  uint32_t bits_ = 0;
};

// The layout rules of ops/ops.h. The last `packed_inner` dims are packed (contiguous among
// themselves); the dim before them may have any stride >= their span ("row stride free" for 2-D
// tensors, "token stride free" for [.., T, H, D]); dims before that are packed around it.
// packed_inner < 0 means the whole tensor is contiguous. Strides of size-1 dims are not checked.
struct Layout {
  int packed_inner = -1;
  static Layout Contiguous() { return {-1}; }
  static Layout RowStrideFree() { return {1}; }
  static Layout TokenStrideFree() { return {2}; }
};

class OpChecker {
 public:
  OpChecker(const char* op, const Context& ctx) : op_(op), device_(ctx.device()) {}

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  // Defined, on the context's device, with `ndim` dims. Call before reading dims off a tensor.
  bool Ranked(const Tensor& t, const char* name, int ndim);
  // Defined, on the device, shape `dims`, dtype in `dtypes`, layout `layout`.
  bool Expect(const Tensor& t, const char* name, std::initializer_list<Dim> dims,
              const DTypeSet& dtypes, Layout layout);
  // Defined, on the device, contiguous, dtype in `dtypes`, any shape.
  bool ExpectContiguous(const Tensor& t, const char* name, const DTypeSet& dtypes);
  // Records "Op: <parts...>" unless cond. The message is only built on failure.
  template <typename... Args>
  bool Require(bool cond, const Args&... parts) {
    if (ok() && !cond) Fail(StrCat(parts...));
    return ok();
  }

 private:
  void Fail(const std::string& message);
  bool CheckPresent(const Tensor& t, const char* name);
  bool CheckDType(const Tensor& t, const char* name, const DTypeSet& dtypes);
  bool CheckLayout(const Tensor& t, const char* name, Layout layout);

  const char* op_;
  Device device_;
  Status status_;
};

// f32 on a CPU context; f32 or bf16 on a CUDA context.
DTypeSet FloatDTypes(const Context& ctx);

// Stride (elements) of the free dim `d` of a validated tensor; the packed span of the dims after it
// when a size-1 dim carries a smaller stride (never used to step, but kernels and BLAS want a
// valid leading dimension).
int64_t LeadingStride(const Tensor& t, int d);

// "x f32[17, 96]" for error messages.
std::string Describe(const char* name, const Tensor& t);

#ifdef TANDEM_WITH_CUDA
inline cudaStream_t StreamOf(Context& ctx) { return ctx.cuda()->stream; }

// Scratch bytes from the context's allocator, returned when the tensor goes out of scope. Safe
// while queued kernels still use it: a context has one stream, which orders the reuse.
StatusOr<Tensor> AllocateScratch(Context& ctx, size_t num_bytes);

Status CudaError(cudaError_t err, const char* op, const Context& ctx, const std::string& what);
// OK, or Internal "Op on cuda:N (<describe()>): cudaErrorX (text)"; describe() runs on failure
// only.
template <typename Describer>
Status CudaResult(cudaError_t err, const char* op, const Context& ctx, const Describer& describe) {
  if (err == cudaSuccess) return Status::Ok();
  return CudaError(err, op, ctx, describe());
}
#endif

}  // namespace tandem::ops::internal
