// Allocators: where tensor bytes come from.
//
// An Allocator hands out byte ranges on one device and takes them back. Tensors remember the
// allocator that made their storage and return it when the last view goes away, so an allocator
// must outlive every tensor made from it (owners create allocators before, and destroy them after,
// the tensors they hold).
//
// Implementations: HostAllocator() (plain aligned heap, stateless), CudaCachingAllocator (per
// device, caches freed blocks by size, keeps statistics; see core/cuda_allocator.h) and
// PinnedHostAllocator (page-locked host memory for fast transfers).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/device.h"
#include "core/status.h"

namespace tandem {

struct AllocatorStats {
  size_t bytes_in_use = 0;       // handed out and not yet returned
  size_t peak_bytes_in_use = 0;  // maximum of bytes_in_use since creation or ResetPeak()
  size_t bytes_reserved = 0;     // held from the driver, in use or cached
  int64_t num_allocs = 0;        // Allocate() calls that succeeded
  int64_t num_driver_allocs = 0; // allocations that went to the driver (cache misses)
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // Returns at least num_bytes bytes aligned to 256 bytes (num_bytes may be 0: a valid unique
  // pointer is still returned). ResourceExhausted when memory runs out.
  virtual StatusOr<void*> Allocate(size_t num_bytes) = 0;
  // Returns memory from Allocate(); num_bytes must be the size asked for.
  virtual void Deallocate(void* ptr, size_t num_bytes) = 0;
  virtual Device device() const = 0;
  virtual AllocatorStats stats() const { return {}; }
  virtual void ResetPeak() {}
};

// The process-wide host allocator: 256-byte aligned heap memory. Stateless (no statistics), so
// sharing it breaks no isolation between tests or devices. Thread-safe.
Allocator& HostAllocator();

}  // namespace tandem
