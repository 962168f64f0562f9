// Storage::Transfer (the retry loop shared by every implementation) and PosixStorage.
#include "offload/storage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "offload/internal/io_error.h"

namespace tandem::offload {

using internal::ErrnoStatus;

namespace {
const char* KindName(IoKind kind) { return kind == IoKind::kRead ? "read" : "write"; }
}  // namespace

Status Storage::Transfer(std::span<const IoRequest> requests) {
  struct Todo {
    IoRequest request;  // the part still to do
    IoRequest original;
  };
  std::vector<Todo> todo;
  todo.reserve(requests.size());
  for (const IoRequest& r : requests) {
    if (r.num_bytes > 0) todo.push_back({r, r});
  }
  std::vector<IoRequest> batch;
  while (!todo.empty()) {
    batch.clear();
    for (const Todo& t : todo) batch.push_back(t.request);
    TANDEM_ASSIGN_OR_RETURN(const IoTicket ticket, Submit(batch));
    TANDEM_ASSIGN_OR_RETURN(const std::vector<IoResult> results, Wait(ticket));
    std::vector<Todo> next;
    for (size_t i = 0; i < todo.size(); ++i) {
      const IoResult& r = results[i];
      Todo& t = todo[i];
      if (!r.status.ok()) return r.status;
      if (r.num_bytes_done >= t.request.num_bytes) continue;
      if (r.num_bytes_done == 0) {
        const size_t done = t.request.offset - t.original.offset;
        if (t.request.kind == IoKind::kRead) {
          return OutOfRangeError(StrCat("reading ", path(), ": expected ", t.original.num_bytes,
                                        " bytes at offset ", t.original.offset,
                                        ", the file ends after ", done, " of them"));
        }
        return InternalError(StrCat("writing ", path(), ": ", t.original.num_bytes,
                                    " bytes at offset ", t.original.offset,
                                    " made no progress after ", done, " bytes"));
      }
      t.request.offset += r.num_bytes_done;
      t.request.data = static_cast<char*>(t.request.data) + r.num_bytes_done;
      t.request.num_bytes -= r.num_bytes_done;
      next.push_back(t);
    }
    todo = std::move(next);
  }
  return Status::Ok();
}

Status Storage::Write(uint64_t offset, const void* data, size_t num_bytes) {
  const IoRequest r{IoKind::kWrite, offset, const_cast<void*>(data), num_bytes};
  return Transfer(std::span<const IoRequest>(&r, 1));
}

Status Storage::Read(uint64_t offset, void* data, size_t num_bytes) {
  const IoRequest r{IoKind::kRead, offset, data, num_bytes};
  return Transfer(std::span<const IoRequest>(&r, 1));
}

// ---------------------------------------------------------------------------------------------

StatusOr<std::unique_ptr<PosixStorage>> PosixStorage::Open(const std::string& path, bool create) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (fd < 0) return ErrnoStatus(errno, StrCat("opening ", path));
  return std::unique_ptr<PosixStorage>(new PosixStorage(fd, path));
}

PosixStorage::~PosixStorage() { ::close(fd_); }

StatusOr<IoTicket> PosixStorage::Submit(std::span<const IoRequest> requests) {
  std::vector<IoResult> results(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const IoRequest& r = requests[i];
    IoResult& out = results[i];
    while (out.num_bytes_done < r.num_bytes) {  // one request: loop until done, EOF or error
      char* p = static_cast<char*>(r.data) + out.num_bytes_done;
      const size_t n = r.num_bytes - out.num_bytes_done;
      const off_t off = static_cast<off_t>(r.offset + out.num_bytes_done);
      const ssize_t got =
          r.kind == IoKind::kRead ? ::pread(fd_, p, n, off) : ::pwrite(fd_, p, n, off);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        out.status = ErrnoStatus(
            errno, StrCat(KindName(r.kind), " of ", n, " bytes at offset ", off, " of ", path_));
        break;
      }
      if (got == 0) break;  // end of file: reported short
      out.num_bytes_done += static_cast<size_t>(got);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  const IoTicket ticket = next_ticket_++;
  done_.emplace_back(ticket, std::move(results));
  return ticket;
}

StatusOr<std::vector<IoResult>> PosixStorage::Wait(IoTicket ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = done_.begin(); it != done_.end(); ++it) {
    if (it->first != ticket) continue;
    std::vector<IoResult> results = std::move(it->second);
    done_.erase(it);
    return results;
  }
  return NotFoundError(StrCat(path_, ": no pending ticket ", ticket));
}

Status PosixStorage::Flush() {
  if (::fdatasync(fd_) != 0) return ErrnoStatus(errno, StrCat("fdatasync of ", path_));
  return Status::Ok();
}

StatusOr<uint64_t> PosixStorage::SizeBytes() {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return ErrnoStatus(errno, StrCat("fstat of ", path_));
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace tandem::offload
