// StagingPool: a pinned host pool of fixed-size slabs for I/O and host<->device copies.
//
// One contiguous allocation of num_slabs * slab_bytes bytes, 4096-aligned (so O_DIRECT accepts
// every slab). In CUDA builds with a visible device it comes from cudaHostAlloc (page-locked and
// known to CUDA, so cudaMemcpyAsync from a slab is truly asynchronous); otherwise from
// posix_memalign. The io_uring engine registers the slabs as its fixed buffers.
//
//   TANDEM_ASSIGN_OR_RETURN(auto pool, StagingPool::Create({.slab_bytes = 4 << 20, .num_slabs =
//   8})); StagingPool::Slab s = pool->Acquire();   // blocks while every slab is taken
//   ... use s.data[0, pool->slab_bytes()) ...
//   pool->Release(s);
//
// Ownership: the pool owns the memory; slabs are lent out and must be released before the pool is
// destroyed (checked). Thread-safety: Acquire/TryAcquire/Release/stats are thread-safe.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "core/status.h"

namespace tandem::offload {

struct StagingPoolOptions {
  size_t slab_bytes = size_t{4} << 20;  // bytes per slab; a positive multiple of 4096
  int num_slabs = 16;                   // slabs in the pool, >= 1
  bool pin_with_cuda = true;            // use cudaHostAlloc when CUDA and a device are present
};

struct StagingPoolStats {
  int64_t num_acquires = 0;   // successful Acquire/TryAcquire calls
  int64_t num_waits = 0;      // Acquire calls that had to wait for a Release
  int slabs_in_use = 0;       // lent out now
  int peak_slabs_in_use = 0;  // most lent out at once
};

class StagingPool {
 public:
  struct Slab {
    int index = -1;        // 0 .. num_slabs-1: the io_uring fixed-buffer index too
    char* data = nullptr;  // slab_bytes bytes, 4096-aligned
  };

  // InvalidArgument for a bad size or count; ResourceExhausted when memory cannot be had.
  static StatusOr<std::unique_ptr<StagingPool>> Create(const StagingPoolOptions& options);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  // Blocks until a slab is free.
  Slab Acquire();
  std::optional<Slab> TryAcquire();
  // Returns a slab from Acquire; releasing one that is not lent out is a programmer error.
  void Release(const Slab& slab);

  size_t slab_bytes() const { return slab_bytes_; }
  int num_slabs() const { return num_slabs_; }
  char* slab_data(int index) const { return base_ + static_cast<size_t>(index) * slab_bytes_; }
  char* base() const { return base_; }
  size_t total_bytes() const { return slab_bytes_ * static_cast<size_t>(num_slabs_); }
  // True when the memory came from cudaHostAlloc (page-locked, registered with CUDA).
  bool cuda_pinned() const { return cuda_pinned_; }
  StagingPoolStats stats() const;

 private:
  StagingPool(char* base, size_t slab_bytes, int num_slabs, bool cuda_pinned);
  Slab TakeLocked();

  char* base_;
  size_t slab_bytes_;
  int num_slabs_;
  bool cuda_pinned_;
  mutable std::mutex mu_;
  std::condition_variable freed_;
  std::vector<int> free_;   // indices of free slabs
  std::vector<bool> lent_;  // per slab
  StagingPoolStats stats_;
};

}  // namespace tandem::offload
