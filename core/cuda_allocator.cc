// Caching allocators over cudaMalloc (one device) and cudaHostAlloc (pinned host memory).
//
// Sizes are rounded to classes: requests up to kSmallLimit to a multiple of kSmallRound, larger
// ones to a multiple of kLargeRound. Freed blocks go to a free list keyed by block size; a request
// takes the smallest cached block that fits and wastes at most half of it, so large cached blocks
// are not spent on small requests. Blocks are never split or merged: the rounding bounds the waste
// and keeps the bookkeeping trivial.
#include "core/cuda_allocator.h"

#ifdef TANDEM_WITH_CUDA

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/cuda_check.h"

namespace tandem {
namespace {

constexpr size_t kSmallRound = 512;
constexpr size_t kSmallLimit = size_t{1} << 20;  // 1 MiB
constexpr size_t kLargeRound = size_t{2} << 20;  // 2 MiB

size_t RoundSize(size_t num_bytes) {
  if (num_bytes == 0) return kSmallRound;
  const size_t unit = num_bytes <= kSmallLimit ? kSmallRound : kLargeRound;
  return (num_bytes + unit - 1) / unit * unit;
}

// Where blocks come from: the driver calls of one memory kind.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual cudaError_t Malloc(void** ptr, size_t num_bytes) = 0;
  virtual cudaError_t Free(void* ptr) = 0;
  virtual Device device() const = 0;
};

// Makes `device` current for the lifetime of the guard and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) {
      cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

class DeviceBackend final : public Backend {
 public:
  explicit DeviceBackend(int device) : device_(device) {}
  cudaError_t Malloc(void** ptr, size_t num_bytes) override {
    DeviceGuard guard(device_);
    return cudaMalloc(ptr, num_bytes);
  }
  cudaError_t Free(void* ptr) override {
    DeviceGuard guard(device_);
    return cudaFree(ptr);
  }
  Device device() const override { return Device::Cuda(device_); }

 private:
  int device_;
};

class PinnedBackend final : public Backend {
 public:
  cudaError_t Malloc(void** ptr, size_t num_bytes) override {
    return cudaHostAlloc(ptr, num_bytes, cudaHostAllocDefault);
  }
  cudaError_t Free(void* ptr) override { return cudaFreeHost(ptr); }
  Device device() const override { return Device::Cpu(); }
};

class CachingAllocatorImpl final : public CachingAllocator {
 public:
  explicit CachingAllocatorImpl(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}

  // Returns every block to the driver, cached or still handed out (tensors must not outlive their
  // allocator; see core/allocator.h). Errors are ignored: at process exit the runtime may
  // already be unloading.
  ~CachingAllocatorImpl() override {
    for (auto& [size, ptrs] : free_) {
      for (void* p : ptrs) backend_->Free(p);
    }
    for (auto& [p, size] : in_use_) backend_->Free(p);
  }

  StatusOr<void*> Allocate(size_t num_bytes) override {
    const size_t size = RoundSize(num_bytes);
    std::lock_guard<std::mutex> lock(mu_);
    void* ptr = TakeCached(size);
    if (ptr == nullptr) {
      TANDEM_ASSIGN_OR_RETURN(ptr, MallocLocked(num_bytes, size));
      stats_.num_driver_allocs++;
      stats_.bytes_reserved += size;
    }
    in_use_.emplace(ptr, size);
    stats_.num_allocs++;
    stats_.bytes_in_use += size;
    stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
    return ptr;
  }

  void Deallocate(void* ptr, size_t num_bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = in_use_.find(ptr);
    TANDEM_CHECK_MSG(it != in_use_.end(), "Deallocate of a pointer this allocator (",
                     backend_->device().ToString(), ") did not hand out");
    const size_t size = it->second;
    TANDEM_CHECK_MSG(RoundSize(num_bytes) <= size, "Deallocate with ", num_bytes,
                     " bytes, but the block holds ", size);
    in_use_.erase(it);
    stats_.bytes_in_use -= size;
    free_[size].push_back(ptr);
  }

  Device device() const override { return backend_->device(); }

  AllocatorStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void ResetPeak() override {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }

  void ReleaseCached() override {
    std::lock_guard<std::mutex> lock(mu_);
    ReleaseCachedLocked();
  }

 private:
  // The smallest cached block of at least `size` bytes and at most twice that, or nullptr.
  void* TakeCached(size_t size) {
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > 2 * size) return nullptr;
    void* ptr = it->second.back();
    it->second.pop_back();
    if (it->second.empty()) free_.erase(it);
    return ptr;
  }

  // A fresh block from the driver; on out-of-memory, empties the cache and tries once more.
  StatusOr<void*> MallocLocked(size_t num_bytes, size_t size) {
    void* ptr = nullptr;
    cudaError_t err = backend_->Malloc(&ptr, size);
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the error so later calls do not report it
      ReleaseCachedLocked();
      err = backend_->Malloc(&ptr, size);
    }
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return ResourceExhaustedError(StrCat(
          device().ToString(), (device().is_cpu() ? " pinned" : ""), ": out of memory allocating ",
          num_bytes, " bytes (", size, " rounded); ", stats_.bytes_in_use, " bytes in use, ",
          stats_.bytes_reserved, " reserved after releasing the cache"));
    }
    if (err != cudaSuccess) {
      cudaGetLastError();
      return InternalError(StrCat(device().ToString(), ": allocating ", size, " bytes: ",
                                  cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
    }
    return ptr;
  }

  void ReleaseCachedLocked() {
    for (auto& [size, ptrs] : free_) {
      for (void* p : ptrs) {
        backend_->Free(p);
        stats_.bytes_reserved -= size;
      }
    }
    free_.clear();
  }

  const std::unique_ptr<Backend> backend_;
  mutable std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;  // block size -> cached blocks
  std::unordered_map<void*, size_t> in_use_;   // handed out: pointer -> block size
  AllocatorStats stats_;
};

}  // namespace

StatusOr<std::unique_ptr<CachingAllocator>> CreateCudaCachingAllocator(int device_index) {
  const int count = CudaDeviceCount();
  if (device_index < 0 || device_index >= count) {
    return UnavailableError(StrCat("CreateCudaCachingAllocator: cuda:", device_index,
                                   " requested but ", count, " CUDA device(s) are visible"));
  }
  return std::unique_ptr<CachingAllocator>(
      new CachingAllocatorImpl(std::make_unique<DeviceBackend>(device_index)));
}

StatusOr<std::unique_ptr<CachingAllocator>> CreatePinnedHostAllocator() {
  if (CudaDeviceCount() == 0) {
    return UnavailableError("CreatePinnedHostAllocator: no CUDA device is visible");
  }
  return std::unique_ptr<CachingAllocator>(
      new CachingAllocatorImpl(std::make_unique<PinnedBackend>()));
}

}  // namespace tandem

#else  // !TANDEM_WITH_CUDA

namespace tandem {

StatusOr<std::unique_ptr<CachingAllocator>> CreateCudaCachingAllocator(int device_index) {
  return UnimplementedError(
      StrCat("CreateCudaCachingAllocator(", device_index, "): this build has no CUDA support"));
}

StatusOr<std::unique_ptr<CachingAllocator>> CreatePinnedHostAllocator() {
  return UnimplementedError("CreatePinnedHostAllocator: this build has no CUDA support");
}

}  // namespace tandem

#endif  // TANDEM_WITH_CUDA
