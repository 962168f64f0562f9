// IoUringStorage: the liburing engine behind offload::Storage.
//
// Every request is cut into segments: block-aligned file ranges of at most one staging slab.
// A segment is issued when a slab and a queue slot are free and no in-flight segment that
// overlaps it writes (or is overwritten): overlapping requests therefore take effect in
// submission order. Writes copy the caller's bytes into the slab, first reading the partial edge
// blocks (read-modify-write); reads copy out of the slab on completion. Short completions are
// resubmitted for the remainder; a read that hits end of file before the caller's bytes is
// OutOfRange. The CRC32C of every block written is kept in an in-memory index and checked when
// the block is read back.
#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <unordered_map>

#include "core/logging.h"
#include "offload/internal/crc32c.h"
#include "offload/internal/io_error.h"
#include "offload/storage.h"

namespace tandem::offload {

using internal::ErrnoStatus;

namespace {

struct Segment {
  IoTicket ticket = 0;
  size_t request = 0;  // index of the request in its batch
  IoKind kind = IoKind::kRead;
  uint64_t file_offset = 0;  // block-aligned
  size_t length = 0;         // block-aligned, <= slab_bytes
  size_t done = 0;           // bytes of the operation completed so far
  StagingPool::Slab slab;
  char* user = nullptr;  // the caller's bytes that map to [user_skip, user_skip + user_len)
  size_t user_skip = 0;
  size_t user_len = 0;
  std::vector<uint32_t> crcs;  // writes: CRC32C per block, computed while the slab is hot
};

struct Batch {
  std::vector<IoResult> results;
  int64_t outstanding = 0;  // segments not finished
};

bool Overlaps(const Segment& a, const Segment& b) {
  return a.file_offset < b.file_offset + b.length && b.file_offset < a.file_offset + a.length;
}

}  // namespace

struct IoUringStorage::Impl {
  std::string path;
  IoUringStorageOptions options;
  int fd = -1;
  bool direct = false;
  bool fixed_file = false;
  bool fixed_buffers = false;
  io_uring ring{};
  bool ring_ready = false;
  std::unique_ptr<StagingPool> pool;

  std::mutex mu;
  IoTicket next_ticket = 1;
  uint64_t next_segment = 1;
  std::map<IoTicket, Batch> batches;
  std::unordered_map<uint64_t, Segment> segments;
  std::deque<uint64_t> queued;      // segment ids not yet issued, in submission order
  std::vector<uint64_t> in_flight;  // segment ids owned by the kernel
  int unsubmitted = 0;              // prepared SQEs not yet passed to io_uring_submit
  std::vector<uint32_t> crc;        // per block
  std::vector<uint8_t> has_crc;     // per block: crc[] is valid
  IoUringStorageStats stats;

  ~Impl();
  Status Setup();
  void Enqueue(IoTicket ticket, size_t index, const IoRequest& r);
  Status Pump(bool block);
  bool TryIssue(uint64_t id);
  Status PrepareWrite(Segment& s);
  Status Prepare(uint64_t id, Segment& s);
  Status SubmitPrepared();
  void Complete(uint64_t id, int res);
  void Finish(uint64_t id, const Status& status);
  Status VerifyBlocks(const Segment& s, size_t from, size_t to) const;
  void RecordBlocks(const Segment& s);
  void ForgetBlocks(const Segment& s);
  std::string Describe(const Segment& s) const {
    return StrCat(s.kind == IoKind::kRead ? "read" : "write", " of ", s.length - s.done,
                  " bytes at offset ", s.file_offset + s.done, " of ", path);
  }
};

IoUringStorage::Impl::~Impl() {
  // The kernel may still write into slabs: reap every in-flight operation before freeing them.
  if (ring_ready) {
    if (unsubmitted > 0) io_uring_submit(&ring);
    while (!in_flight.empty()) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(&ring, &cqe) != 0) break;
      const uint64_t id = io_uring_cqe_get_data64(cqe);
      io_uring_cqe_seen(&ring, cqe);
      auto it = std::find(in_flight.begin(), in_flight.end(), id);
      if (it != in_flight.end()) in_flight.erase(it);
      auto seg = segments.find(id);
      if (seg != segments.end()) pool->Release(seg->second.slab);
    }
    io_uring_queue_exit(&ring);
  }
  if (fd >= 0) ::close(fd);
}

Status IoUringStorage::Impl::Setup() {
  const int rc = io_uring_queue_init(static_cast<unsigned>(options.queue_depth), &ring, 0);
  if (rc < 0) return ErrnoStatus(-rc, StrCat("io_uring_queue_init(", options.queue_depth, ")"));
  ring_ready = true;
  if (io_uring_register_files(&ring, &fd, 1) == 0) {
    fixed_file = true;
  } else {
    TANDEM_LOG(WARNING, "offload") << path << ": io_uring_register_files failed; using plain fd";
  }
  if (options.register_buffers) {
    std::vector<iovec> iov(pool->num_slabs());
    for (int i = 0; i < pool->num_slabs(); ++i) iov[i] = {pool->slab_data(i), pool->slab_bytes()};
    const int brc = io_uring_register_buffers(&ring, iov.data(), static_cast<unsigned>(iov.size()));
    if (brc == 0) {
      fixed_buffers = true;
    } else {
      TANDEM_LOG(WARNING, "offload")
          << path << ": io_uring_register_buffers of " << pool->total_bytes() << " bytes failed ("
          << std::strerror(-brc) << "; RLIMIT_MEMLOCK?); using unregistered buffers";
    }
  }
  return Status::Ok();
}

void IoUringStorage::Impl::Enqueue(IoTicket ticket, size_t index, const IoRequest& r) {
  const uint64_t block = options.block_bytes;
  const uint64_t begin = r.offset;
  const uint64_t end = r.offset + r.num_bytes;
  const uint64_t a0 = begin / block * block;
  const uint64_t a1 = (end + block - 1) / block * block;
  for (uint64_t s0 = a0; s0 < a1; s0 += pool->slab_bytes()) {
    Segment s;
    s.ticket = ticket;
    s.request = index;
    s.kind = r.kind;
    s.file_offset = s0;
    s.length = static_cast<size_t>(std::min<uint64_t>(pool->slab_bytes(), a1 - s0));
    const uint64_t u0 = std::max(begin, s0);
    const uint64_t u1 = std::min(end, s0 + s.length);
    s.user = static_cast<char*>(r.data) + (u0 - begin);
    s.user_skip = static_cast<size_t>(u0 - s0);
    s.user_len = static_cast<size_t>(u1 - u0);
    const uint64_t id = next_segment++;
    segments.emplace(id, s);
    queued.push_back(id);
    ++batches[ticket].outstanding;
  }
}

// Issues queued segments in order while slots, slabs and ordering allow; submits; reaps.
Status IoUringStorage::Impl::Pump(bool block) {
  while (!queued.empty() && TryIssue(queued.front())) queued.pop_front();
  if (unsubmitted > 0) TANDEM_RETURN_IF_ERROR(SubmitPrepared());
  if (in_flight.empty()) return Status::Ok();
  io_uring_cqe* cqe = nullptr;
  int rc = block ? io_uring_wait_cqe(&ring, &cqe) : io_uring_peek_cqe(&ring, &cqe);
  while (rc == -EINTR && block) rc = io_uring_wait_cqe(&ring, &cqe);
  if (rc == -EAGAIN && !block) return Status::Ok();
  if (rc < 0) return ErrnoStatus(-rc, StrCat("io_uring_wait_cqe on ", path));
  while (cqe != nullptr) {
    const uint64_t id = io_uring_cqe_get_data64(cqe);
    const int res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
    Complete(id, res);
    // Refill the queue before the next completion is copied out and checked: the device keeps
    // queue_depth operations while this thread does the CPU work of a burst of completions.
    while (!queued.empty() && TryIssue(queued.front())) queued.pop_front();
    if (unsubmitted > 0) TANDEM_RETURN_IF_ERROR(SubmitPrepared());
    cqe = nullptr;
    if (io_uring_peek_cqe(&ring, &cqe) != 0) break;
  }
  if (unsubmitted > 0) TANDEM_RETURN_IF_ERROR(SubmitPrepared());
  return Status::Ok();
}

bool IoUringStorage::Impl::TryIssue(uint64_t id) {
  Segment& s = segments.at(id);
  if (static_cast<int>(in_flight.size()) >= options.queue_depth) return false;
  for (uint64_t other : in_flight) {
    const Segment& o = segments.at(other);
    if ((o.kind == IoKind::kWrite || s.kind == IoKind::kWrite) && Overlaps(o, s)) return false;
  }
  std::optional<StagingPool::Slab> slab = pool->TryAcquire();
  if (!slab) return false;
  s.slab = *slab;
  in_flight.push_back(id);
  Status st = s.kind == IoKind::kWrite ? PrepareWrite(s) : Status::Ok();
  if (st.ok()) st = Prepare(id, s);
  if (!st.ok()) Finish(id, st);
  return true;
}

// Fills the slab for a write: the edge blocks the caller only partly covers come from the file.
Status IoUringStorage::Impl::PrepareWrite(Segment& s) {
  const size_t block = options.block_bytes;
  const size_t head_end = s.user_skip;
  const size_t tail_begin = s.user_skip + s.user_len;
  auto fill_block = [&](size_t at) -> Status {
    ++stats.num_rmw_reads;
    size_t got = 0;
    while (got < block) {
      const ssize_t n = ::pread(fd, s.slab.data + at + got, block - got,
                                static_cast<off_t>(s.file_offset + at + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        return ErrnoStatus(errno, StrCat("read-modify-write: read of ", block, " bytes at offset ",
                                         s.file_offset + at, " of ", path));
      }
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    std::memset(s.slab.data + at + got, 0, block - got);  // past end of file: zeros
    if (got == block) return VerifyBlocks(s, at, at + block);
    return Status::Ok();
  };
  // Only the first block can start mid-way (user_skip < block) and only the last end mid-way.
  const bool head_partial = head_end != 0;
  if (head_partial) TANDEM_RETURN_IF_ERROR(fill_block(0));
  if (tail_begin < s.length) {
    const size_t tail_block = tail_begin / block * block;
    if (!(head_partial && tail_block == 0)) TANDEM_RETURN_IF_ERROR(fill_block(tail_block));
  }
  // Block by block: copy the caller's part, then checksum the block while it is in L1.
  const size_t user_end = s.user_skip + s.user_len;
  if (options.verify_checksums) s.crcs.resize(s.length / block);
  for (size_t b0 = 0; b0 < s.length; b0 += block) {
    const size_t c0 = std::max(b0, s.user_skip), c1 = std::min(b0 + block, user_end);
    if (c0 < c1) std::memcpy(s.slab.data + c0, s.user + (c0 - s.user_skip), c1 - c0);
    if (options.verify_checksums) s.crcs[b0 / block] = internal::Crc32c(s.slab.data + b0, block);
  }
  return Status::Ok();
}

Status IoUringStorage::Impl::Prepare(uint64_t id, Segment& s) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (sqe == nullptr) {  // the SQ is full of prepared entries: hand them over and retry
    TANDEM_RETURN_IF_ERROR(SubmitPrepared());
    sqe = io_uring_get_sqe(&ring);
    if (sqe == nullptr) return InternalError(StrCat("io_uring: no free SQE for ", Describe(s)));
  }
  const int file = fixed_file ? 0 : fd;
  char* buf = s.slab.data + s.done;
  const unsigned len = static_cast<unsigned>(s.length - s.done);
  const uint64_t off = s.file_offset + s.done;
  if (s.kind == IoKind::kRead) {
    if (fixed_buffers)
      io_uring_prep_read_fixed(sqe, file, buf, len, off, s.slab.index);
    else
      io_uring_prep_read(sqe, file, buf, len, off);
  } else {
    if (fixed_buffers)
      io_uring_prep_write_fixed(sqe, file, buf, len, off, s.slab.index);
    else
      io_uring_prep_write(sqe, file, buf, len, off);
  }
  if (fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
  io_uring_sqe_set_data64(sqe, id);
  ++stats.num_ops_submitted;
  if (++unsubmitted >= options.submit_batch) return SubmitPrepared();
  return Status::Ok();
}

Status IoUringStorage::Impl::SubmitPrepared() {
  while (unsubmitted > 0) {
    const int rc = io_uring_submit(&ring);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) return ErrnoStatus(-rc, StrCat("io_uring_submit on ", path));
    ++stats.num_submit_calls;
    unsubmitted -= rc;
    if (rc == 0) break;
  }
  unsubmitted = std::max(unsubmitted, 0);
  return Status::Ok();
}

void IoUringStorage::Impl::Complete(uint64_t id, int res) {
  Segment& s = segments.at(id);
  if (res == -EAGAIN || res == -EINTR) {
    const Status st = Prepare(id, s);
    if (!st.ok()) Finish(id, st);
    return;
  }
  if (res < 0) {
    if (s.kind == IoKind::kWrite) ForgetBlocks(s);
    Finish(id, ErrnoStatus(-res, Describe(s)));
    return;
  }
  s.done += static_cast<size_t>(res);
  if (s.done < s.length) {
    if (res == 0) {
      if (s.kind == IoKind::kRead && s.done >= s.user_skip + s.user_len) {
        s.length = s.done;  // end of file after the caller's bytes: nothing missing
      } else if (s.kind == IoKind::kRead) {
        Finish(id,
               OutOfRangeError(StrCat("reading ", path, ": bytes up to offset ",
                                      s.file_offset + s.user_skip + s.user_len,
                                      " requested, the file ends at ", s.file_offset + s.done)));
        return;
      } else {
        ForgetBlocks(s);
        Finish(id, InternalError(StrCat(Describe(s), " made no progress")));
        return;
      }
    } else {
      ++stats.num_short_retries;
      const Status st = Prepare(id, s);
      if (!st.ok()) Finish(id, st);
      return;
    }
  }
  if (s.kind == IoKind::kWrite) {
    stats.bytes_written += static_cast<int64_t>(s.length);
    RecordBlocks(s);
    Finish(id, Status::Ok());
    return;
  }
  stats.bytes_read += static_cast<int64_t>(s.length);
  const Status st = VerifyBlocks(s, 0, s.length);
  if (st.ok()) std::memcpy(s.user, s.slab.data + s.user_skip, s.user_len);
  Finish(id, st);
}

void IoUringStorage::Impl::Finish(uint64_t id, const Status& status) {
  auto it = segments.find(id);
  Segment& s = it->second;
  pool->Release(s.slab);
  in_flight.erase(std::find(in_flight.begin(), in_flight.end(), id));
  Batch& b = batches[s.ticket];
  IoResult& r = b.results[s.request];
  if (!status.ok() && r.status.ok()) r.status = status;
  if (status.ok()) r.num_bytes_done += s.user_len;
  --b.outstanding;
  segments.erase(it);
}

// Checks blocks [from, to) of the slab (segment-relative byte range, block-aligned) against the
// index. Blocks never written through this object carry no checksum and pass.
Status IoUringStorage::Impl::VerifyBlocks(const Segment& s, size_t from, size_t to) const {
  if (!options.verify_checksums) return Status::Ok();
  const size_t block = options.block_bytes;
  for (size_t at = from; at + block <= to; at += block) {
    const uint64_t b = (s.file_offset + at) / block;
    if (b >= has_crc.size() || !has_crc[b]) continue;
    const uint32_t got = internal::Crc32c(s.slab.data + at, block);
    if (got != crc[b]) {
      return DataLossError(StrCat("checksum mismatch in ", path, " block ", b, " (bytes ",
                                  b * block, "..", (b + 1) * block, "): stored CRC32C ", crc[b],
                                  ", read ", got));
    }
  }
  return Status::Ok();
}

void IoUringStorage::Impl::RecordBlocks(const Segment& s) {
  if (!options.verify_checksums) return;
  const size_t block = options.block_bytes;
  const uint64_t last = (s.file_offset + s.length) / block;
  if (has_crc.size() < last) {
    has_crc.resize(last, 0);
    crc.resize(last, 0);
  }
  for (size_t k = 0; k < s.crcs.size(); ++k) {
    const uint64_t b = s.file_offset / block + k;
    crc[b] = s.crcs[k];
    has_crc[b] = 1;
  }
}

void IoUringStorage::Impl::ForgetBlocks(const Segment& s) {
  const size_t block = options.block_bytes;
  for (uint64_t b = s.file_offset / block;
       b < (s.file_offset + s.length) / block && b < has_crc.size(); ++b) {
    has_crc[b] = 0;
  }
}

// ---------------------------------------------------------------------------------------------

namespace {
Status ValidateOptions(const IoUringStorageOptions& o) {
  if (o.block_bytes == 0 || o.block_bytes % 4096 != 0) {
    return InvalidArgumentError(
        StrCat("io_uring storage: block_bytes must be a positive multiple of 4096, found ",
               o.block_bytes));
  }
  if (o.slab_bytes == 0 || o.slab_bytes % o.block_bytes != 0) {
    return InvalidArgumentError(StrCat("io_uring storage: slab_bytes must be a positive multiple ",
                                       "of block_bytes (", o.block_bytes, "), found ",
                                       o.slab_bytes));
  }
  if (o.queue_depth < 1 || o.queue_depth > 4096 || o.submit_batch < 1 || o.num_slabs < 0) {
    return InvalidArgumentError(StrCat("io_uring storage: expected 1 <= queue_depth <= 4096, ",
                                       "submit_batch >= 1, num_slabs >= 0; found ", o.queue_depth,
                                       ", ", o.submit_batch, ", ", o.num_slabs));
  }
  return Status::Ok();
}
}  // namespace

StatusOr<std::unique_ptr<IoUringStorage>> IoUringStorage::Open(
    const std::string& path, const IoUringStorageOptions& options) {
  TANDEM_RETURN_IF_ERROR(ValidateOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->options = options;
  const int flags = O_RDWR | O_CLOEXEC | (options.create ? O_CREAT : 0);
  impl->fd = options.direct_io ? ::open(path.c_str(), flags | O_DIRECT, 0644) : -1;
  impl->direct = impl->fd >= 0;
  if (!impl->direct) {
    if (options.direct_io && errno != EINVAL) return ErrnoStatus(errno, StrCat("opening ", path));
    if (options.direct_io) {
      TANDEM_LOG(WARNING, "offload") << path << ": the filesystem refuses O_DIRECT; falling back "
                                     << "to buffered I/O (page cache)";
    }
    impl->fd = ::open(path.c_str(), flags, 0644);
    if (impl->fd < 0) return ErrnoStatus(errno, StrCat("opening ", path));
  }
  struct stat st;
  if (::fstat(impl->fd, &st) != 0) return ErrnoStatus(errno, StrCat("fstat of ", path));
  if (impl->direct && static_cast<uint64_t>(st.st_size) % options.block_bytes != 0) {
    return FailedPreconditionError(StrCat(
        path, " has ", st.st_size, " bytes, not a multiple of the ", options.block_bytes,
        "-byte block O_DIRECT needs; pad or truncate it, or open it with direct_io = false"));
  }
  TANDEM_ASSIGN_OR_RETURN(
      impl->pool,
      StagingPool::Create({options.slab_bytes,
                           options.num_slabs > 0 ? options.num_slabs : options.queue_depth,
                           options.pin_with_cuda}));
  TANDEM_RETURN_IF_ERROR(impl->Setup());
  return std::unique_ptr<IoUringStorage>(new IoUringStorage(std::move(impl)));
}

IoUringStorage::IoUringStorage(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
IoUringStorage::~IoUringStorage() = default;

StatusOr<IoTicket> IoUringStorage::Submit(std::span<const IoRequest> requests) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const IoTicket ticket = impl_->next_ticket++;
  impl_->batches[ticket].results.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i].num_bytes > 0) impl_->Enqueue(ticket, i, requests[i]);
  }
  TANDEM_RETURN_IF_ERROR(impl_->Pump(/*block=*/false));
  return ticket;
}

StatusOr<std::vector<IoResult>> IoUringStorage::Wait(IoTicket ticket) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->batches.find(ticket);
  if (it == impl_->batches.end()) {
    return NotFoundError(StrCat(impl_->path, ": no pending ticket ", ticket));
  }
  while (it->second.outstanding > 0) {
    if (impl_->in_flight.empty() && impl_->queued.empty()) {
      return InternalError(StrCat(impl_->path, ": ticket ", ticket, " has ", it->second.outstanding,
                                  " segments but none queued or in flight"));
    }
    TANDEM_RETURN_IF_ERROR(impl_->Pump(/*block=*/true));
  }
  std::vector<IoResult> results = std::move(it->second.results);
  impl_->batches.erase(it);
  return results;
}

Status IoUringStorage::Flush() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (::fdatasync(impl_->fd) != 0) return ErrnoStatus(errno, StrCat("fdatasync of ", impl_->path));
  return Status::Ok();
}

StatusOr<uint64_t> IoUringStorage::SizeBytes() {
  struct stat st;
  if (::fstat(impl_->fd, &st) != 0) return ErrnoStatus(errno, StrCat("fstat of ", impl_->path));
  return static_cast<uint64_t>(st.st_size);
}

const std::string& IoUringStorage::path() const { return impl_->path; }
bool IoUringStorage::direct_io() const { return impl_->direct; }
bool IoUringStorage::fixed_buffers() const { return impl_->fixed_buffers; }
IoUringStorageStats IoUringStorage::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

}  // namespace tandem::offload
