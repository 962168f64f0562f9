#include "trainer/internal/data_tar.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <utility>

namespace tandem::trainer::internal {
namespace {

constexpr uint64_t kBlock = 512;

gzFile AsGz(void* p) { return static_cast<gzFile>(p); }

std::string Field(const char* h, size_t offset, size_t len) {
  const char* p = h + offset;
  return std::string(p, strnlen(p, len));
}

// Octal (space/NUL terminated) or GNU base-256 (high bit of the first byte) number.
bool ParseNumber(const char* p, size_t len, uint64_t* out) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  uint64_t v = 0;
  if (u[0] & 0x80) {
    if (u[0] != 0x80) return false;  // negative or too large
    for (size_t i = 1; i < len; ++i) {
      if (v >> 56) return false;
      v = (v << 8) | u[i];
    }
    *out = v;
    return true;
  }
  size_t i = 0;
  while (i < len && p[i] == ' ') ++i;
  bool any = false;
  for (; i < len && p[i] >= '0' && p[i] <= '7'; ++i) {
    if (v >> 60) return false;
    v = v * 8 + static_cast<uint64_t>(p[i] - '0');
    any = true;
  }
  for (; i < len; ++i) {
    if (p[i] != ' ' && p[i] != '\0') return false;
  }
  *out = v;
  return any;
}

bool ChecksumOk(const char* h, uint64_t stored) {
  uint64_t unsigned_sum = 0;
  int64_t signed_sum = 0;
  for (uint64_t i = 0; i < kBlock; ++i) {
    const bool in_field = i >= 148 && i < 156;
    unsigned_sum += in_field ? ' ' : static_cast<unsigned char>(h[i]);
    signed_sum += in_field ? ' ' : static_cast<signed char>(h[i]);
  }
  return stored == unsigned_sum || static_cast<int64_t>(stored) == signed_sum;
}

// The "path" record of a pax extended header ("<len> path=<value>\n" records), or "".
std::string PaxPath(std::string_view data) {
  while (!data.empty()) {
    const size_t space = data.find(' ');
    if (space == std::string_view::npos) break;
    size_t len = 0;
    for (size_t i = 0; i < space; ++i) {
      if (data[i] < '0' || data[i] > '9') return "";
      len = len * 10 + static_cast<size_t>(data[i] - '0');
    }
    if (len <= space + 1 || len > data.size()) return "";
    const std::string_view record = data.substr(space + 1, len - space - 2);  // no '\n'
    if (record.substr(0, 5) == "path=") return std::string(record.substr(5));
    data.remove_prefix(len);
  }
  return "";
}

}  // namespace

StatusOr<TarReader> TarReader::Open(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    return NotFoundError(StrCat("archive '", path, "' does not exist"));
  }
  gzFile gz = gzopen(path.c_str(), "rb");
  if (gz == nullptr) return InternalError(StrCat("cannot open archive '", path, "'"));
  gzbuffer(gz, 1 << 17);
  return TarReader(gz, path);
}

TarReader::TarReader(TarReader&& o) noexcept
    : gz_(std::exchange(o.gz_, nullptr)), path_(std::move(o.path_)), offset_(o.offset_) {}

TarReader& TarReader::operator=(TarReader&& o) noexcept {
  if (this != &o) {
    if (gz_ != nullptr) gzclose(AsGz(gz_));
    gz_ = std::exchange(o.gz_, nullptr);
    path_ = std::move(o.path_);
    offset_ = o.offset_;
  }
  return *this;
}

TarReader::~TarReader() {
  if (gz_ != nullptr) gzclose(AsGz(gz_));
}

Status TarReader::Read(char* out, uint64_t n, bool* eof) {
  char scratch[1 << 14];
  const uint64_t start = offset_;
  if (eof != nullptr) *eof = false;
  while (n > 0) {
    const unsigned want = static_cast<unsigned>(std::min<uint64_t>(n, sizeof(scratch)));
    const int got = gzread(AsGz(gz_), out != nullptr ? out : scratch, want);
    if (got < 0 || (got == 0 && gzeof(AsGz(gz_)) == 0)) {
      int errnum = 0;
      const char* msg = gzerror(AsGz(gz_), &errnum);
      return DataLossError(StrCat("archive '", path_, "': corrupted compressed data near byte ",
                                  offset_, " of the tar stream: ", msg ? msg : "read error"));
    }
    if (got == 0) {
      int errnum = 0;
      const char* msg = gzerror(AsGz(gz_), &errnum);
      if (offset_ == start && eof != nullptr && errnum == Z_OK) {
        *eof = true;
        return Status::Ok();
      }
      return DataLossError(StrCat("archive '", path_, "': truncated: the stream ends at byte ",
                                  offset_, " inside an entry",
                                  errnum != Z_OK ? StrCat(" (", msg, ")") : std::string()));
    }
    if (out != nullptr) out += got;
    n -= static_cast<uint64_t>(got);
    offset_ += static_cast<uint64_t>(got);
  }
  return Status::Ok();
}

Status TarReader::ReadData(uint64_t size, std::string* out) {
  const uint64_t padded = (size + kBlock - 1) / kBlock * kBlock;
  if (out == nullptr) return Read(nullptr, padded, nullptr);
  out->resize(size);
  TANDEM_RETURN_IF_ERROR(Read(out->data(), size, nullptr));
  return Read(nullptr, padded - size, nullptr);
}

StatusOr<std::optional<TarEntry>> TarReader::Next(
    const std::function<bool(const std::string&)>& want) {
  std::string long_name;  // from a preceding GNU 'L' or pax 'x' entry
  while (true) {
    char h[kBlock];
    const uint64_t at = offset_;
    bool eof = false;
    TANDEM_RETURN_IF_ERROR(Read(h, kBlock, &eof));
    if (eof) {
      return DataLossError(StrCat("archive '", path_, "': truncated: ends at byte ", at,
                                  " without the end-of-archive marker"));
    }
    if (std::all_of(h, h + kBlock, [](char c) { return c == 0; })) return std::nullopt;
    const std::string where =
        StrCat("archive '", path_, "': header at byte ", at, " (entry '", Field(h, 0, 100), "'): ");
    uint64_t checksum = 0, size = 0;
    if (!ParseNumber(h + 148, 8, &checksum) || !ChecksumOk(h, checksum)) {
      return DataLossError(where + "checksum mismatch: corrupted or not a tar archive");
    }
    const bool ustar = std::memcmp(h + 257, "ustar\0", 6) == 0;
    const bool gnu = std::memcmp(h + 257, "ustar  \0", 8) == 0;
    if (!ustar && !gnu) return DataLossError(where + "no ustar magic: not a ustar archive");
    if (!ParseNumber(h + 124, 12, &size)) return DataLossError(where + "bad size field");
    const char type = h[156];
    std::string name = Field(h, 0, 100);
    if (ustar && h[345] != 0) name = Field(h, 345, 155) + "/" + name;
    if (!long_name.empty()) name = std::exchange(long_name, std::string());
    if (type == 'L' || type == 'x') {
      std::string data;
      TANDEM_RETURN_IF_ERROR(ReadData(size, &data));
      long_name = type == 'L' ? std::string(data.c_str()) : PaxPath(data);
      continue;
    }
    const bool regular = type == '0' || type == '\0' || type == '7';
    if (!regular || !want(name)) {
      // Links, devices, directories and fifos carry no data; anything else is read past.
      const bool no_data = type >= '1' && type <= '6';
      TANDEM_RETURN_IF_ERROR(ReadData(no_data ? 0 : size, nullptr));
      continue;
    }
    TarEntry entry;
    entry.name = std::move(name);
    TANDEM_RETURN_IF_ERROR(ReadData(size, &entry.contents));
    return std::optional<TarEntry>(std::move(entry));
  }
}

}  // namespace tandem::trainer::internal
