// Device and pinned-host allocators (see core/allocator.h for the contract).
//
// CreateCudaCachingAllocator(device): a caching allocator for one CUDA device. Freed blocks are
// kept in size-class free lists and reused, so steady-state training makes no cudaMalloc calls;
// stats() reports bytes in use, the peak and bytes reserved from the driver. ReleaseCached()
// returns cached blocks to the driver. Thread-safe. Blocks are reused in the order freed on the
// host: callers that free memory still read by queued kernels must run those kernels on the one
// stream they allocate for (the ops::Context rule), which orders the reuse correctly.
//
// CreatePinnedHostAllocator(): page-locked host memory (cudaHostAlloc) for fast, asynchronous
// host<->device copies; cached like the device allocator.
//
// Both return Unimplemented in CPU-only builds.
#pragma once

#include <memory>

#include "core/allocator.h"

namespace tandem {

class CachingAllocator : public Allocator {
 public:
  // Returns every cached (free) block to the driver.
  virtual void ReleaseCached() = 0;
};

StatusOr<std::unique_ptr<CachingAllocator>> CreateCudaCachingAllocator(int device_index);
StatusOr<std::unique_ptr<CachingAllocator>> CreatePinnedHostAllocator();

}  // namespace tandem
