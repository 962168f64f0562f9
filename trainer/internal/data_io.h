// File helpers of the data pipeline: an atomic writer (tmp file, fsync, rename), a read-only
// mapping and whole-file reads. Errors name the path and the failing system call.
//
// Each object owns one fd or mapping (move-only). Not thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace tandem::trainer::internal {

// Writes a temporary file; CommitAs fsyncs it, renames it over the final path and fsyncs the
// directory. A writer destroyed before CommitAs removes its temporary file.
class FileWriter {
 public:
  static StatusOr<FileWriter> Create(const std::string& tmp_path);
  FileWriter(FileWriter&& o) noexcept;
  FileWriter& operator=(FileWriter&& o) noexcept;
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;
  ~FileWriter();

  Status Write(const void* data, size_t num_bytes);
  Status WriteAt(uint64_t offset, const void* data, size_t num_bytes);
  Status CommitAs(const std::string& final_path);

 private:
  FileWriter(int fd, std::string tmp_path) : fd_(fd), tmp_path_(std::move(tmp_path)) {}
  void Abandon();

  int fd_ = -1;
  std::string tmp_path_;
};

// `contents` to `path` through FileWriter (atomic replace).
Status WriteFileAtomic(const std::string& path, std::string_view contents);

// Whole file as a string; NotFound naming the path when it does not exist.
StatusOr<std::string> ReadFileToString(const std::string& path);

// A read-only private mapping of a whole file (an empty file maps to no bytes).
class MappedFile {
 public:
  static StatusOr<MappedFile> Open(const std::string& path);
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const uint8_t* data() const { return static_cast<const uint8_t*>(map_); }
  size_t size() const { return size_; }
  // Hands the mapping to the caller, who munmaps it.
  void Release(void** map, size_t* num_bytes);

 private:
  MappedFile(void* map, size_t size) : map_(map), size_(size) {}
  void* map_ = nullptr;
  size_t size_ = 0;
};

}  // namespace tandem::trainer::internal
