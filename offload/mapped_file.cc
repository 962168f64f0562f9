// Host memory mapped from files of its own (see mapped_file.h).
#include "offload/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>

#include "core/logging.h"
#include "offload/internal/io_error.h"

namespace tandem::offload {

namespace {
constexpr size_t kBlock = 4096;
}  // namespace

MappedFileAllocator::~MappedFileAllocator() {
  for (auto& [start, file] : live_) {
    TANDEM_LOG(ERROR, "offload") << "MappedFileAllocator destroyed with " << file.path
                                 << " still allocated; removing it";
    ::munmap(const_cast<char*>(start), file.mapped_bytes);
    ::unlink(file.path.c_str());
  }
}

StatusOr<void*> MappedFileAllocator::Allocate(size_t num_bytes) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir_, ec)) {
    return NotFoundError(StrCat("mapped host memory: the directory '", dir_,
                                "' does not exist (or is no directory)"));
  }
  const size_t bytes = std::max<size_t>(kBlock, (num_bytes + kBlock - 1) / kBlock * kBlock);
  std::string path;
  {
    std::lock_guard<std::mutex> lock(mu_);
    path = StrCat(dir_, "/tandem-mapped-", ::getpid(), "-", next_++, ".bin");
  }
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return internal::ErrnoStatus(errno, StrCat("creating ", path));
  auto fail = [&](int err, const std::string& what) {
    ::close(fd);
    ::unlink(path.c_str());
    return internal::ErrnoStatus(err, StrCat(what, " ", path, " (", bytes, " bytes)"));
  };
  // Reserve every block now: a full disk fails here, not as a SIGBUS when a page is first written.
  const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (err != 0) return fail(err, "reserving");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail(errno, "mapping");
  ::close(fd);  // the mapping keeps the file open
  std::lock_guard<std::mutex> lock(mu_);
  live_[static_cast<const char*>(p)] = File{path, bytes};
  stats_.bytes_in_use += bytes;
  stats_.bytes_reserved += bytes;
  stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
  ++stats_.num_allocs;
  ++stats_.num_driver_allocs;
  return p;
}

void MappedFileAllocator::Deallocate(void* ptr, size_t num_bytes) {
  if (ptr == nullptr) return;
  File file;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(static_cast<const char*>(ptr));
    TANDEM_CHECK_MSG(it != live_.end(), "MappedFileAllocator::Deallocate of an unknown pointer");
    file = it->second;
    live_.erase(it);
    stats_.bytes_in_use -= file.mapped_bytes;
    stats_.bytes_reserved -= file.mapped_bytes;
  }
  (void)num_bytes;
  ::munmap(ptr, file.mapped_bytes);
  ::unlink(file.path.c_str());
}

AllocatorStats MappedFileAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

StatusOr<std::string> MappedFileAllocator::PathOf(const void* inside) const {
  const char* p = static_cast<const char*>(inside);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.upper_bound(p);
  if (it != live_.begin()) {
    --it;
    if (p < it->first + it->second.mapped_bytes) return it->second.path;
  }
  return NotFoundError("MappedFileAllocator::PathOf: the pointer is in none of its allocations");
}

}  // namespace tandem::offload
