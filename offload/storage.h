// Storage: byte-addressed files for offloaded tensors (optimizer state, weights) with batched,
// asynchronous reads and writes.
//
// Implementations:
//   PosixStorage           plain pread/pwrite on a buffered file: the reference.
//   IoUringStorage         liburing engine: O_DIRECT file, registered file and fixed buffers from
//                          one pinned staging pool, queue depth and submission batching, any
//                          offset and size (bounced through the pool, read-modify-write at
//                          unaligned edges), CRC32C per block verified on every read.
//   FaultInjectingStorage  wraps any Storage; short reads/writes, EIO, ENOSPC after N bytes,
//                          deterministic from a seed (tests).
//
// The request model: Submit(requests) starts a batch and returns a ticket; Wait(ticket) returns
// one IoResult per request. A request may complete *short* (OK status, fewer bytes done), as
// read(2) may; Transfer/Read/Write below resubmit the remainder until done, and turn a read that
// makes no progress into OutOfRange (end of file). Errors: ResourceExhausted for ENOSPC, DataLoss
// for EIO and checksum mismatches, OutOfRange for reads past the end, InvalidArgument and
// FailedPrecondition for bad files; each message names the file, offset and size.
//
//   TANDEM_ASSIGN_OR_RETURN(auto file, IoUringStorage::Open(path, {}));
//   TANDEM_RETURN_IF_ERROR(file->Write(offset, data, n));
//   TANDEM_RETURN_IF_ERROR(file->Read(offset, out, n));
//
// Ownership: a Storage owns its file descriptor (and ring, pool); request buffers belong to the
// caller and must stay valid until Wait returns. Thread-safety: every method may be called from
// any thread; implementations serialize internally. Requests in flight together may overlap:
// they take effect in submission order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"
#include "offload/staging_pool.h"

namespace tandem::offload {

enum class IoKind : uint8_t { kRead, kWrite };

struct IoRequest {
  IoKind kind = IoKind::kRead;
  uint64_t offset = 0;   // byte offset in the file
  void* data = nullptr;  // caller's host buffer: read into, or written from
  size_t num_bytes = 0;
};

struct IoResult {
  Status status;  // first error of this request, or OK
  size_t num_bytes_done =
      0;  // bytes transferred from the start of the request (< num_bytes: short)
};

using IoTicket = uint64_t;

class Storage {
 public:
  virtual ~Storage() = default;

  // Starts every request and returns a ticket for Wait. Buffers must stay valid until Wait.
  virtual StatusOr<IoTicket> Submit(std::span<const IoRequest> requests) = 0;
  // Waits for a ticket's requests; results[i] belongs to requests[i]. NotFound for an unknown
  // (or already waited) ticket.
  virtual StatusOr<std::vector<IoResult>> Wait(IoTicket ticket) = 0;
  // Makes completed writes durable (fdatasync).
  virtual Status Flush() = 0;
  // Current size of the file in bytes.
  virtual StatusOr<uint64_t> SizeBytes() = 0;
  // The file path (for messages).
  virtual const std::string& path() const = 0;

  // Submits, waits, and resubmits the remainder of short requests until every byte is done.
  // Returns the first error; a read that makes no progress is OutOfRange (end of file).
  Status Transfer(std::span<const IoRequest> requests);
  Status Write(uint64_t offset, const void* data, size_t num_bytes);
  Status Read(uint64_t offset, void* data, size_t num_bytes);
};

// ---------------------------------------------------------------------------------------------

// Plain pread/pwrite on a buffered file, executed inside Submit. The reference implementation.
class PosixStorage : public Storage {
 public:
  // Opens (creating when `create`) the file read-write.
  static StatusOr<std::unique_ptr<PosixStorage>> Open(const std::string& path, bool create = true);
  ~PosixStorage() override;

  StatusOr<IoTicket> Submit(std::span<const IoRequest> requests) override;
  StatusOr<std::vector<IoResult>> Wait(IoTicket ticket) override;
  Status Flush() override;
  StatusOr<uint64_t> SizeBytes() override;
  const std::string& path() const override { return path_; }

 private:
  PosixStorage(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
  std::mutex mu_;
  std::vector<std::pair<IoTicket, std::vector<IoResult>>> done_;
  IoTicket next_ticket_ = 1;
};

// ---------------------------------------------------------------------------------------------

struct IoUringStorageOptions {
  bool create = true;                   // create the file when missing
  bool direct_io = true;                // O_DIRECT; falls back to buffered I/O (with a warning)
                                        // where the filesystem refuses it (tmpfs)
  int queue_depth = 32;                 // io_uring submission queue entries (operations in flight)
  int submit_batch = 8;                 // prepared operations per io_uring_submit call
  size_t block_bytes = 4096;            // alignment and checksum granularity (multiple of 4096)
  size_t slab_bytes = size_t{1} << 20;  // staging slab size: the largest single operation
  int num_slabs = 0;                    // staging slabs; 0 = queue_depth
  bool verify_checksums = true;  // CRC32C per block, checked on every read of a written block
  bool register_buffers = true;  // register the slabs as io_uring fixed buffers
  bool pin_with_cuda = true;     // staging pool from cudaHostAlloc where CUDA is present
};

struct IoUringStorageStats {
  int64_t num_ops_submitted = 0;  // io_uring operations (one per slab-sized segment, plus retries)
  int64_t num_submit_calls = 0;   // io_uring_submit calls
  int64_t num_short_retries = 0;  // operations resubmitted after a short completion
  int64_t num_rmw_reads = 0;      // edge blocks read for read-modify-write
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
};

class IoUringStorage : public Storage {
 public:
  // Errors: InvalidArgument for bad options; FailedPrecondition for an existing file whose size
  // is not a multiple of block_bytes under O_DIRECT; NotFound when missing and !create;
  // Internal when io_uring cannot be set up.
  static StatusOr<std::unique_ptr<IoUringStorage>> Open(const std::string& path,
                                                        const IoUringStorageOptions& options);
  ~IoUringStorage() override;

  StatusOr<IoTicket> Submit(std::span<const IoRequest> requests) override;
  StatusOr<std::vector<IoResult>> Wait(IoTicket ticket) override;
  Status Flush() override;
  StatusOr<uint64_t> SizeBytes() override;
  const std::string& path() const override;

  // False when O_DIRECT was refused and the file is buffered.
  bool direct_io() const;
  // True when the staging slabs are registered io_uring fixed buffers.
  bool fixed_buffers() const;
  IoUringStorageStats stats() const;

  struct Impl;

 private:
  explicit IoUringStorage(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------

struct FaultOptions {
  uint64_t seed = 1;
  double short_read_probability = 0.0;   // a read completes with a random shorter prefix
  double short_write_probability = 0.0;  // a write stores only a random shorter prefix
  double eio_probability = 0.0;          // a request fails with EIO (DataLoss), nothing moved
  // Writes fail with ENOSPC (ResourceExhausted) once this many bytes have been written through
  // the wrapper; the write that crosses the limit stores the bytes that fit. < 0: never.
  int64_t enospc_after_bytes = -1;
};

struct FaultStats {
  int64_t short_reads = 0;
  int64_t short_writes = 0;
  int64_t eio = 0;
  int64_t enospc = 0;
};

// Wraps `inner` (not owned; must outlive the wrapper). Decisions come from a counter-based
// generator keyed by the seed and the request's sequence number, so a run is reproducible.
class FaultInjectingStorage : public Storage {
 public:
  FaultInjectingStorage(Storage* inner, const FaultOptions& options);
  ~FaultInjectingStorage() override;

  StatusOr<IoTicket> Submit(std::span<const IoRequest> requests) override;
  StatusOr<std::vector<IoResult>> Wait(IoTicket ticket) override;
  Status Flush() override { return inner_->Flush(); }
  StatusOr<uint64_t> SizeBytes() override { return inner_->SizeBytes(); }
  const std::string& path() const override { return inner_->path(); }
  FaultStats stats() const;

 private:
  struct Pending;
  Storage* inner_;
  FaultOptions options_;
  mutable std::mutex mu_;
  uint64_t sequence_ = 0;
  int64_t bytes_written_ = 0;
  FaultStats stats_;
  std::vector<std::unique_ptr<Pending>> pending_;
  IoTicket next_ticket_ = 1;
};

}  // namespace tandem::offload
