// StagingPool: pinned slabs (cudaHostAlloc when CUDA is present, posix_memalign otherwise).
#include "offload/staging_pool.h"

#include <cstdlib>

#include "core/device.h"

#if defined(TANDEM_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace tandem::offload {
namespace {
constexpr size_t kAlign = 4096;

// Pinned memory from CUDA, or nullptr when CUDA cannot give it (CPU build, no device, no memory).
char* TryCudaHostAlloc(size_t num_bytes) {
#if defined(TANDEM_WITH_CUDA)
  if (!CudaAvailable()) return nullptr;
  void* p = nullptr;
  if (cudaHostAlloc(&p, num_bytes, cudaHostAllocPortable) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls are not confused
    return nullptr;
  }
  return static_cast<char*>(p);
#else
  (void)num_bytes;
  return nullptr;
#endif
}
}  // namespace

StatusOr<std::unique_ptr<StagingPool>> StagingPool::Create(const StagingPoolOptions& options) {
  if (options.slab_bytes == 0 || options.slab_bytes % kAlign != 0) {
    return InvalidArgumentError(StrCat("staging pool: slab_bytes must be a positive multiple of ",
                                       kAlign, ", found ", options.slab_bytes));
  }
  if (options.num_slabs < 1) {
    return InvalidArgumentError(
        StrCat("staging pool: num_slabs must be >= 1, found ", options.num_slabs));
  }
  const size_t total = options.slab_bytes * static_cast<size_t>(options.num_slabs);
  char* base = options.pin_with_cuda ? TryCudaHostAlloc(total) : nullptr;
  const bool cuda_pinned = base != nullptr;
  if (base == nullptr) {
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, total) != 0) {
      return ResourceExhaustedError(
          StrCat("staging pool: could not allocate ", total, " bytes of host memory"));
    }
    base = static_cast<char*>(p);
  }
  return std::unique_ptr<StagingPool>(
      new StagingPool(base, options.slab_bytes, options.num_slabs, cuda_pinned));
}

StagingPool::StagingPool(char* base, size_t slab_bytes, int num_slabs, bool cuda_pinned)
    : base_(base),
      slab_bytes_(slab_bytes),
      num_slabs_(num_slabs),
      cuda_pinned_(cuda_pinned),
      lent_(num_slabs, false) {
  free_.reserve(num_slabs);
  for (int i = num_slabs - 1; i >= 0; --i) free_.push_back(i);  // slab 0 is handed out first
}

StagingPool::~StagingPool() {
  TANDEM_CHECK_MSG(stats_.slabs_in_use == 0, "staging pool destroyed with ", stats_.slabs_in_use,
                   " slabs still lent out");
#if defined(TANDEM_WITH_CUDA)
  if (cuda_pinned_) {
    cudaFreeHost(base_);
    return;
  }
#endif
  std::free(base_);
}

StagingPool::Slab StagingPool::TakeLocked() {
  const int index = free_.back();
  free_.pop_back();
  lent_[index] = true;
  ++stats_.num_acquires;
  ++stats_.slabs_in_use;
  if (stats_.slabs_in_use > stats_.peak_slabs_in_use)
    stats_.peak_slabs_in_use = stats_.slabs_in_use;
  return Slab{index, slab_data(index)};
}

StagingPool::Slab StagingPool::Acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  if (free_.empty()) {
    ++stats_.num_waits;
    freed_.wait(lock, [&] { return !free_.empty(); });
  }
  return TakeLocked();
}

std::optional<StagingPool::Slab> StagingPool::TryAcquire() {
  std::lock_guard<std::mutex> lock(mu_);
  if (free_.empty()) return std::nullopt;
  return TakeLocked();
}

void StagingPool::Release(const Slab& slab) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    TANDEM_CHECK_MSG(slab.index >= 0 && slab.index < num_slabs_ && lent_[slab.index],
                     "releasing slab ", slab.index, " which is not lent out");
    lent_[slab.index] = false;
    free_.push_back(slab.index);
    --stats_.slabs_in_use;
  }
  freed_.notify_one();
}

StagingPoolStats StagingPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace tandem::offload
