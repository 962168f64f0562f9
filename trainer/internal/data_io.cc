#include "trainer/internal/data_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

namespace tandem::trainer::internal {
namespace {

Status Errno(const std::string& what, const std::string& path) {
  const int e = errno;
  const std::string msg = StrCat(what, " '", path, "': ", std::strerror(e));
  if (e == ENOENT) return NotFoundError(msg);
  if (e == ENOSPC || e == EDQUOT) return ResourceExhaustedError(msg);
  return InternalError(msg);
}

}  // namespace

StatusOr<FileWriter> FileWriter::Create(const std::string& tmp_path) {
  const int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp_path);
  return FileWriter(fd, tmp_path);
}

FileWriter::FileWriter(FileWriter&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)), tmp_path_(std::move(o.tmp_path_)) {}

FileWriter& FileWriter::operator=(FileWriter&& o) noexcept {
  if (this != &o) {
    Abandon();
    fd_ = std::exchange(o.fd_, -1);
    tmp_path_ = std::move(o.tmp_path_);
  }
  return *this;
}

FileWriter::~FileWriter() { Abandon(); }

void FileWriter::Abandon() {
  if (fd_ < 0) return;
  ::close(fd_);
  ::unlink(tmp_path_.c_str());
  fd_ = -1;
}

Status FileWriter::Write(const void* data, size_t num_bytes) {
  const char* p = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t n = ::write(fd_, p, num_bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("cannot write", tmp_path_);
    p += n;
    num_bytes -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status FileWriter::WriteAt(uint64_t offset, const void* data, size_t num_bytes) {
  const char* p = static_cast<const char*>(data);
  while (num_bytes > 0) {
    const ssize_t n = ::pwrite(fd_, p, num_bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("cannot write", tmp_path_);
    p += n;
    offset += static_cast<uint64_t>(n);
    num_bytes -= static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status FileWriter::CommitAs(const std::string& final_path) {
  if (::fsync(fd_) != 0) return Errno("cannot fsync", tmp_path_);
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) {
    ::unlink(tmp_path_.c_str());
    return Errno("cannot close", tmp_path_);
  }
  if (::rename(tmp_path_.c_str(), final_path.c_str()) != 0) {
    Status s = Errno(StrCat("cannot rename ", tmp_path_, " to"), final_path);
    ::unlink(tmp_path_.c_str());
    return s;
  }
  const std::string dir = std::filesystem::path(final_path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // best effort: some file systems do not allow fsync on directories
    ::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

Status WriteFileAtomic(const std::string& path, std::string_view contents) {
  TANDEM_ASSIGN_OR_RETURN(FileWriter w, FileWriter::Create(path + ".tmp"));
  TANDEM_RETURN_IF_ERROR(w.Write(contents.data(), contents.size()));
  return w.CommitAs(path);
}

StatusOr<std::string> ReadFileToString(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  std::string out;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = Errno("cannot read", path);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = Errno("cannot stat", path);
    ::close(fd);
    return s;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgumentError(StrCat("'", path, "' is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* map = nullptr;
  if (size > 0) {
    map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      Status s = Errno("cannot mmap", path);
      ::close(fd);
      return s;
    }
  }
  ::close(fd);
  return MappedFile(map, size);
}

MappedFile::MappedFile(MappedFile&& o) noexcept
    : map_(std::exchange(o.map_, nullptr)), size_(std::exchange(o.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) ::munmap(map_, size_);
    map_ = std::exchange(o.map_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

void MappedFile::Release(void** map, size_t* num_bytes) {
  *map = std::exchange(map_, nullptr);
  *num_bytes = std::exchange(size_, 0);
}

}  // namespace tandem::trainer::internal
