// MappedFileAllocator: host memory that is a shared mapping (MAP_SHARED) of a file of its own, for
// state whose home is NVMe: code reads and writes it through ordinary pointers (the kernel pages it
// in and writes it back, so it may exceed host memory), and the hot path reads the same file with
// direct I/O (IoUringStorage), which the kernel keeps coherent with the mapping (dirty pages of a
// range are written back before a direct read of it).
//
//   MappedFileAllocator files("/nvme/scratch");
//   TANDEM_ASSIGN_OR_RETURN(Tensor t, Tensor::Empty({n}, DType::kBF16, files));
//   TANDEM_ASSIGN_OR_RETURN(std::string path, files.PathOf(t.raw_data()));
//   TANDEM_ASSIGN_OR_RETURN(auto file, IoUringStorage::Open(path, {.create = false}));
//
// Each allocation is a new file `<dir>/tandem-mapped-<pid>-<n>.bin`, its blocks reserved up front
// (fallocate: a full disk is ResourceExhausted here, never a SIGBUS at a later page fault), its
// size rounded up to 4096 bytes (O_DIRECT), zero-filled; Deallocate unmaps it and removes the
// file. The files are scratch: the weights' durable copies are checkpoints.
//
// Thread-safety: every method is thread-safe. Ownership: allocations must be returned before the
// allocator is destroyed (checked: the destructor removes the files of any that were not).
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <string>

#include "core/allocator.h"

namespace tandem::offload {

class MappedFileAllocator : public Allocator {
 public:
  // `dir` must exist when Allocate is called (NotFound names it otherwise).
  explicit MappedFileAllocator(std::string dir) : dir_(std::move(dir)) {}
  ~MappedFileAllocator() override;
  MappedFileAllocator(const MappedFileAllocator&) = delete;
  MappedFileAllocator& operator=(const MappedFileAllocator&) = delete;

  StatusOr<void*> Allocate(size_t num_bytes) override;
  void Deallocate(void* ptr, size_t num_bytes) override;
  Device device() const override { return Device::Cpu(); }
  AllocatorStats stats() const override;

  // The file behind the allocation that contains `inside`; NotFound when none does.
  StatusOr<std::string> PathOf(const void* inside) const;
  const std::string& dir() const { return dir_; }

 private:
  struct File {
    std::string path;
    size_t mapped_bytes = 0;
  };
  std::string dir_;
  mutable std::mutex mu_;
  std::map<const char*, File> live_;  // by mapping start
  AllocatorStats stats_;
  uint64_t next_ = 0;
};

}  // namespace tandem::offload
