#include "core/tensor.h"

#include <cstring>
#include <sstream>

#include "core/dtype.h"
#include "core/parallel.h"

#ifdef TANDEM_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tandem {

std::string ShapeToString(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

int64_t ShapeNumel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {
Shape ContiguousStrides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}
}  // namespace

StatusOr<Tensor> Tensor::Empty(const Shape& shape, DType dtype, Allocator& allocator) {
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError(StrCat("negative dimension in shape ", ShapeToString(shape)));
  }
  const size_t num_bytes = static_cast<size_t>(ShapeNumel(shape)) * DTypeSize(dtype);
  TANDEM_ASSIGN_OR_RETURN(void* ptr, allocator.Allocate(num_bytes));
  Allocator* a = &allocator;
  Tensor t;
  t.storage_ = std::make_shared<Storage>(ptr, num_bytes, allocator.device(),
                                         [a, num_bytes](void* p) { a->Deallocate(p, num_bytes); });
  t.shape_ = shape;
  t.strides_ = ContiguousStrides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::Cpu(const Shape& shape, DType dtype) {
  StatusOr<Tensor> t = Empty(shape, dtype, HostAllocator());
  TANDEM_CHECK_OK(t);
  return std::move(t).value();
}

Tensor Tensor::CpuZeros(const Shape& shape, DType dtype) {
  Tensor t = Cpu(shape, dtype);
  std::memset(t.raw_data(), 0, t.num_bytes());
  return t;
}

Tensor Tensor::Wrap(void* data, const Shape& shape, DType dtype, Device device) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>(data, ShapeNumel(shape) * DTypeSize(dtype), device, nullptr);
  t.shape_ = shape;
  t.strides_ = ContiguousStrides(shape);
  t.dtype_ = dtype;
  return t;
}

int64_t Tensor::dim(int i) const {
  if (i < 0) i += ndim();
  TANDEM_CHECK_MSG(i >= 0 && i < ndim(), "dim ", i, " of a ", ndim(), "-d tensor");
  return shape_[i];
}

int64_t Tensor::stride(int i) const {
  if (i < 0) i += ndim();
  TANDEM_CHECK_MSG(i >= 0 && i < ndim(), "stride ", i, " of a ", ndim(), "-d tensor");
  return strides_[i];
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(DTypeSize(dtype_));
}

Tensor Tensor::View(const Shape& shape) const {
  TANDEM_CHECK_MSG(is_contiguous(), "View of a non-contiguous tensor ", DebugString());
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < static_cast<int>(s.size()); ++i) {
    if (s[i] == -1) {
      TANDEM_CHECK_MSG(infer < 0, "View with two -1 dims");
      infer = i;
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) s[infer] = known == 0 ? 0 : numel() / known;
  TANDEM_CHECK_MSG(ShapeNumel(s) == numel(), "View ", ShapeToString(shape), " of ", DebugString());
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = ContiguousStrides(s);
  return t;
}

Tensor Tensor::Slice(int d, int64_t start, int64_t end) const {
  if (d < 0) d += ndim();
  TANDEM_CHECK_MSG(d >= 0 && d < ndim(), "Slice dim ", d, " of ", DebugString());
  TANDEM_CHECK_MSG(0 <= start && start <= end && end <= shape_[d], "Slice [", start, ", ", end,
                   ") of dim ", d, " in ", DebugString());
  Tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  return t;
}

std::string Tensor::DebugString() const {
  if (!defined()) return "undefined tensor";
  return StrCat(DTypeName(dtype_), ShapeToString(shape_), " on ", device().ToString());
}

Status ExpectShape(const Tensor& t, const Shape& shape, const char* name) {
  if (!t.defined()) return InvalidArgumentError(StrCat("tensor '", name, "' is undefined"));
  if (t.shape() != shape) {
    return InvalidArgumentError(StrCat("tensor '", name, "': expected shape ", ShapeToString(shape),
                                       ", found ", ShapeToString(t.shape())));
  }
  return Status::Ok();
}

Status ExpectDType(const Tensor& t, DType dtype, const char* name) {
  if (!t.defined()) return InvalidArgumentError(StrCat("tensor '", name, "' is undefined"));
  if (t.dtype() != dtype) {
    return InvalidArgumentError(StrCat("tensor '", name, "': expected dtype ", DTypeName(dtype),
                                       ", found ", DTypeName(t.dtype())));
  }
  return Status::Ok();
}

namespace {
float LoadAsFloat(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kBF16: return Bf16ToFloat(static_cast<const Bf16*>(p)[i]);
    case DType::kF16: return F16ToFloat(static_cast<const F16*>(p)[i]);
    default: TANDEM_CHECK(false);
  }
  return 0;
}
void StoreFloat(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = v; break;
    case DType::kBF16: static_cast<Bf16*>(p)[i] = FloatToBf16(v); break;
    case DType::kF16: static_cast<F16*>(p)[i] = FloatToF16(v); break;
    default: TANDEM_CHECK(false);
  }
}
}  // namespace

namespace {

// n floating elements converted host to host, split over the cores for large tensors (a 7B
// model's initial weights are 6.7G elements); f32 -> bf16, the common case, without the per
// element dtype switch.
void CastHostElements(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n) {
  ParallelRanges(n, int64_t{1} << 20, [=](int64_t begin, int64_t end) {
    if (src_dtype == DType::kF32 && dst_dtype == DType::kBF16) {
      const float* s = static_cast<const float*>(src);
      Bf16* d = static_cast<Bf16*>(dst);
      for (int64_t i = begin; i < end; ++i) d[i] = FloatToBf16(s[i]);
      return;
    }
    for (int64_t i = begin; i < end; ++i) StoreFloat(dst, dst_dtype, i, LoadAsFloat(src, src_dtype, i));
  });
}

}  // namespace

StatusOr<Tensor> CastCpu(const Tensor& src, DType dtype) {
  if (!src.device().is_cpu() || !src.is_contiguous()) {
    return InvalidArgumentError(StrCat("CastCpu needs a contiguous host tensor, got ", src.DebugString()));
  }
  if (src.dtype() == dtype) {
    Tensor out = Tensor::Cpu(src.shape(), dtype);
    std::memcpy(out.raw_data(), src.raw_data(), src.num_bytes());
    return out;
  }
  if (!IsFloating(src.dtype()) || !IsFloating(dtype)) {
    return InvalidArgumentError(StrCat("cannot cast ", DTypeName(src.dtype()), " to ", DTypeName(dtype)));
  }
  Tensor out = Tensor::Cpu(src.shape(), dtype);
  CastHostElements(out.raw_data(), dtype, src.raw_data(), src.dtype(), src.numel());
  return out;
}

Status CopyTensor(Tensor& dst, const Tensor& src, CudaStream stream) {
  if (dst.shape() != src.shape()) {
    return InvalidArgumentError(StrCat("CopyTensor: shapes differ: dst ", dst.DebugString(), ", src ", src.DebugString()));
  }
  if (!dst.is_contiguous() || !src.is_contiguous()) {
    return InvalidArgumentError(StrCat("CopyTensor needs contiguous tensors: dst ", dst.DebugString(), ", src ", src.DebugString()));
  }
  if (dst.dtype() != src.dtype()) {
    if (dst.device().is_cpu() && src.device().is_cpu() && IsFloating(dst.dtype()) && IsFloating(src.dtype())) {
      CastHostElements(dst.raw_data(), dst.dtype(), src.raw_data(), src.dtype(), src.numel());
      return Status::Ok();
    }
    return InvalidArgumentError(StrCat("CopyTensor: dtype conversion ", DTypeName(src.dtype()), " -> ",
                                       DTypeName(dst.dtype()), " is only done host to host (use ops::Cast on a device)"));
  }
  if (src.num_bytes() == 0) return Status::Ok();
  if (dst.device().is_cpu() && src.device().is_cpu()) {
    std::memmove(dst.raw_data(), src.raw_data(), src.num_bytes());
    return Status::Ok();
  }
#ifdef TANDEM_WITH_CUDA
  cudaError_t err = cudaMemcpyAsync(dst.raw_data(), src.raw_data(), src.num_bytes(), cudaMemcpyDefault,
                                    reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) {
    return InternalError(StrCat("cudaMemcpyAsync ", src.DebugString(), " -> ", dst.DebugString(), ": ",
                                cudaGetErrorString(err)));
  }
  return Status::Ok();
#else
  (void)stream;
  return UnimplementedError(StrCat("CopyTensor to or from ", dst.device().is_cuda() ? dst.device().ToString() : src.device().ToString(),
                                   ": this build has no CUDA support"));
#endif
}

StatusOr<Tensor> CopyToDeviceBlocking(const Tensor& src, Allocator& allocator) {
  TANDEM_ASSIGN_OR_RETURN(Tensor dst, Tensor::Empty(src.shape(), src.dtype(), allocator));
#ifdef TANDEM_WITH_CUDA
  // Work queued on any stream (contexts use non-blocking streams, which the legacy stream's copy
  // would not wait for) may still write `src` or read the memory `dst` reuses: wait for it all.
  if (dst.device().is_cuda() || src.device().is_cuda()) {
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) return InternalError(StrCat("cudaDeviceSynchronize: ", cudaGetErrorString(err)));
  }
#endif
  TANDEM_RETURN_IF_ERROR(CopyTensor(dst, src, nullptr));
#ifdef TANDEM_WITH_CUDA
  if (dst.device().is_cuda() || src.device().is_cuda()) {
    cudaError_t err = cudaStreamSynchronize(nullptr);
    if (err != cudaSuccess) return InternalError(StrCat("cudaStreamSynchronize: ", cudaGetErrorString(err)));
  }
#endif
  return dst;
}

StatusOr<Tensor> CopyToHostBlocking(const Tensor& src) { return CopyToDeviceBlocking(src, HostAllocator()); }

StatusOr<Tensor> CopyToHostOn(const Tensor& src, CudaStream stream) {
  Tensor dst = Tensor::Cpu(src.shape(), src.dtype());
  TANDEM_RETURN_IF_ERROR(CopyTensor(dst, src, stream));
#ifdef TANDEM_WITH_CUDA
  if (src.device().is_cuda()) {
    cudaError_t err = cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream));
    if (err != cudaSuccess)
      return InternalError(StrCat("cudaStreamSynchronize: ", cudaGetErrorString(err)));
  }
#endif
  return dst;
}

}  // namespace tandem
