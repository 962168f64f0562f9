// A minimal tar reader over a gzip stream (zlib's gzread, which also reads an uncompressed tar).
//
// Understands POSIX ustar and GNU headers: regular files ('0', '\0', '7') are returned,
// directories, links and other entries are skipped, GNU long names ('L') and pax "path" records
// ('x') rename the next entry. Every header checksum is verified. Errors are DataLoss naming the
// archive, the byte offset in the uncompressed stream and the entry.
//
// Owns its gzFile (move-only). Not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "core/status.h"

namespace tandem::trainer::internal {

struct TarEntry {
  std::string name;      // full path inside the archive (ustar prefix joined)
  std::string contents;  // empty for entries not wanted (skipped)
};

class TarReader {
 public:
  static StatusOr<TarReader> Open(const std::string& path);
  TarReader(TarReader&& o) noexcept;
  TarReader& operator=(TarReader&& o) noexcept;
  TarReader(const TarReader&) = delete;
  TarReader& operator=(const TarReader&) = delete;
  ~TarReader();

  // The next regular file whose name `want` accepts (others are read past), or nullopt at the
  // end-of-archive marker. An archive that ends without the marker is DataLoss (truncated).
  StatusOr<std::optional<TarEntry>> Next(const std::function<bool(const std::string&)>& want);

 private:
  TarReader(void* gz, std::string path) : gz_(gz), path_(std::move(path)) {}
  // Reads exactly n bytes (into out, or discarded when out is null). *eof is set when the stream
  // ended before the first byte; a later end is DataLoss.
  Status Read(char* out, uint64_t n, bool* eof);
  Status ReadData(uint64_t size, std::string* out);

  void* gz_ = nullptr;  // gzFile
  std::string path_;
  uint64_t offset_ = 0;  // bytes consumed from the uncompressed stream
};

}  // namespace tandem::trainer::internal
