#include "ops/internal/op_util.h"

#include <sstream>

namespace tandem::ops::internal {

std::string DTypeSet::ToString() const {
  std::string out;
  for (int i = 0; i < 32; ++i) {
    if (!((bits_ >> i) & 1u)) continue;
    if (!out.empty()) out += " or ";
    out += DTypeName(static_cast<DType>(i));
  }
  return out;
}

void OpChecker::Fail(const std::string& message) {
  status_ = InvalidArgumentError(StrCat(op_, ": ", message));
}

bool OpChecker::CheckPresent(const Tensor& t, const char* name) {
  if (!ok()) return false;
  if (!t.defined()) {
    Fail(
        StrCat("tensor '", name, "' is undefined (expected a tensor on ", device_.ToString(), ")"));
  } else if (t.device() != device_) {
    Fail(StrCat("tensor '", name, "': expected device ", device_.ToString(), ", found ",
                t.device().ToString()));
  }
  return ok();
}

bool OpChecker::CheckDType(const Tensor& t, const char* name, const DTypeSet& dtypes) {
  if (!dtypes.Contains(t.dtype())) {
    Fail(StrCat("tensor '", name, "': expected dtype ", dtypes.ToString(), " on ",
                device_.ToString(), ", found ", DTypeName(t.dtype())));
  }
  return ok();
}

bool OpChecker::Ranked(const Tensor& t, const char* name, int ndim) {
  if (!CheckPresent(t, name)) return false;
  if (t.ndim() != ndim) {
    Fail(StrCat("tensor '", name, "': expected ", ndim, " dims, found shape ",
                ShapeToString(t.shape())));
  }
  return ok();
}

bool OpChecker::Expect(const Tensor& t, const char* name, std::initializer_list<Dim> dims,
                       const DTypeSet& dtypes, Layout layout) {
  if (!Ranked(t, name, static_cast<int>(dims.size()))) return false;
  int i = 0;
  bool shape_ok = true;
  for (const Dim& d : dims) shape_ok = shape_ok && t.dim(i++) == d.size;
  if (!shape_ok) {
    std::ostringstream want;
    want << "[";
    i = 0;
    for (const Dim& d : dims) want << (i++ ? ", " : "") << d.name << "=" << d.size;
    want << "]";
    Fail(StrCat("tensor '", name, "': expected shape ", want.str(), ", found ",
                ShapeToString(t.shape())));
    return false;
  }
  return CheckDType(t, name, dtypes) && CheckLayout(t, name, layout);
}

bool OpChecker::ExpectContiguous(const Tensor& t, const char* name, const DTypeSet& dtypes) {
  return CheckPresent(t, name) && CheckDType(t, name, dtypes) &&
         CheckLayout(t, name, Layout::Contiguous());
}

bool OpChecker::CheckLayout(const Tensor& t, const char* name, Layout layout) {
  const int nd = t.ndim();
  const int inner = layout.packed_inner < 0 || layout.packed_inner >= nd ? nd : layout.packed_inner;
  const int free_dim = nd - inner - 1;  // -1: no free dim (fully contiguous)
  // Expected strides, innermost first; the free dim needs stride >= span of the dims after it.
  int64_t span = 1;
  bool good = true;
  for (int d = nd - 1; d >= 0 && good; --d) {
    if (d == free_dim) {
      if (t.dim(d) > 1 && t.stride(d) < span) good = false;
      span = LeadingStride(t, d) * t.dim(d);
      continue;
    }
    if (t.dim(d) > 1 && t.stride(d) != span) good = false;
    span *= t.dim(d);
  }
  if (good) return true;
  const char* rule = free_dim < 0 ? "a contiguous tensor"
                     : inner == 1 ? "row-major rows (stride(-1) == 1, row stride >= cols)"
                                  : "packed trailing dims with a free token stride";
  Fail(StrCat("tensor '", name, "': expected ", rule, ", found shape ", ShapeToString(t.shape()),
              " with strides ", ShapeToString(t.strides())));
  return false;
}

DTypeSet FloatDTypes(const Context& ctx) {
  if (ctx.is_cuda()) return {DType::kF32, DType::kBF16};
  return {DType::kF32};
}

int64_t LeadingStride(const Tensor& t, int d) {
  int64_t span = 1;
  for (int i = d + 1; i < t.ndim(); ++i) span *= t.dim(i);
  return t.stride(d) >= span ? t.stride(d) : span;
}

std::string Describe(const char* name, const Tensor& t) {
  return StrCat(name, " ", t.defined() ? DTypeName(t.dtype()) : "undefined",
                ShapeToString(t.shape()));
}

#ifdef TANDEM_WITH_CUDA
StatusOr<Tensor> AllocateScratch(Context& ctx, size_t num_bytes) {
  return Tensor::Empty({static_cast<int64_t>(num_bytes)}, DType::kU8, ctx.allocator());
}

Status CudaError(cudaError_t err, const char* op, const Context& ctx, const std::string& what) {
  return InternalError(StrCat(op, " on ", ctx.device().ToString(), " (", what,
                              "): ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}
#endif

}  // namespace tandem::ops::internal
