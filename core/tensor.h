// Tensor: a typed, shaped, strided view of bytes on one device.
//
// A Tensor is a cheap handle (shape, strides in elements, offset, dtype) over shared storage.
// Copies of the handle share the bytes; the storage goes back to its allocator when the last
// handle is gone. Views (View, Slice) share storage too. A default-constructed Tensor is
// "undefined" (defined() == false) and is how optional tensor arguments are passed.
//
//   Tensor x = Tensor::Cpu({B, T, C}, DType::kF32);      // [B, T, C]
//   float* p = x.data<float>();
//   Tensor rows = x.View({B * T, C}).Slice(0, 0, 17);   // first 17 rows, still shared
//
// Thread-safety: handles may be copied across threads; concurrent writes to the same bytes are
// the caller's problem, as with any buffer.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/status.h"

namespace tandem {

using Shape = std::vector<int64_t>;

std::string ShapeToString(const Shape& shape);  // "[2, 3, 4]"
int64_t ShapeNumel(const Shape& shape);

// Bytes shared by tensors. Owns them when made by an allocator; wraps them otherwise.
class Storage {
 public:
  Storage(void* data, size_t num_bytes, Device device, std::function<void(void*)> release)
      : data_(data), num_bytes_(num_bytes), device_(device), release_(std::move(release)) {}
  ~Storage() {
    if (release_) release_(data_);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t num_bytes() const { return num_bytes_; }
  Device device() const { return device_; }

 private:
  void* data_;
  size_t num_bytes_;
  Device device_;
  std::function<void(void*)> release_;
};

class Tensor {
 public:
  Tensor() = default;

  // Contiguous tensor with uninitialized bytes from `allocator` (on the allocator's device).
  static StatusOr<Tensor> Empty(const Shape& shape, DType dtype, Allocator& allocator);
  // Contiguous host tensor from HostAllocator(); aborts if the host is out of memory.
  static Tensor Cpu(const Shape& shape, DType dtype);
  // Host tensor filled with zeros.
  static Tensor CpuZeros(const Shape& shape, DType dtype);
  // Non-owning contiguous view of memory the caller keeps alive (an mmap, a foreign buffer).
  static Tensor Wrap(void* data, const Shape& shape, DType dtype, Device device);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }  // in elements
  int ndim() const { return static_cast<int>(shape_.size()); }
  // Size of dimension i; negative i counts from the end.
  int64_t dim(int i) const;
  int64_t stride(int i) const;
  int64_t numel() const { return ShapeNumel(shape_); }
  size_t num_bytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::Cpu(); }
  bool is_contiguous() const;

  // Pointer to the first element of this view.
  void* raw_data() const;
  template <typename T>
  T* data() const {
    TANDEM_CHECK_MSG(DTypeOf<T>::value == dtype_, "data<", DTypeName(DTypeOf<T>::value),
                     ">() on a ", DTypeName(dtype_), " tensor");
    return static_cast<T*>(raw_data());
  }

  // Same bytes, new shape; requires a contiguous tensor and the same numel (one dim may be -1).
  Tensor View(const Shape& shape) const;
  // Elements [start, end) along `dim`, sharing storage (may be non-contiguous).
  Tensor Slice(int dim, int64_t start, int64_t end) const;

  // "f32[2, 3] on cpu"
  std::string DebugString() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Shape strides_;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::kF32;
};

// Copies `src` into `dst` (same shape; both contiguous). Handles host<->device and
// device<->device copies on `stream` (asynchronous where the host side is pinned; the caller
// synchronizes before reading host bytes). Host-to-host copies also convert between f32, bf16 and
// f16. Errors name both shapes and dtypes.
Status CopyTensor(Tensor& dst, const Tensor& src, CudaStream stream = nullptr);

// Copy of a host tensor in another floating dtype (f32 <-> bf16 <-> f16), rounding to nearest even.
StatusOr<Tensor> CastCpu(const Tensor& src, DType dtype);

// Returns a new contiguous tensor on `allocator`'s device with the contents of `src`, waiting for
// the copy to finish. When a GPU is involved it first waits for all work queued on the device (on
// every stream), so results of kernels on a context's stream are complete. Convenient for tests,
// loading and once-per-step transfers; not for hot paths.
StatusOr<Tensor> CopyToDeviceBlocking(const Tensor& src, Allocator& allocator);
// Returns a contiguous host copy of `src`, waiting for the copy to finish.
StatusOr<Tensor> CopyToHostBlocking(const Tensor& src);
// A host copy of contiguous `src` made on `stream`: ordered after the work queued there and
// waiting for that stream only, never the whole device. For threads beside one that may be
// capturing a CUDA graph (a device-wide wait would break its capture) and for copies that must
// not wait for other streams' work.
StatusOr<Tensor> CopyToHostOn(const Tensor& src, CudaStream stream);

// Checks used by op and model validation: "tensor 'name': expected [..] bf16 on cuda:0, found ...".
Status ExpectShape(const Tensor& t, const Shape& shape, const char* name);
Status ExpectDType(const Tensor& t, DType dtype, const char* name);

}  // namespace tandem
