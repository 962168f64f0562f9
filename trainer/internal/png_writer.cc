#include "trainer/internal/png_writer.h"

#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace tandem::trainer::internal {
namespace {

constexpr char kSignature[] = "\x89PNG\r\n\x1a\n";

void AppendU32(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>(v >> 24));
  out.push_back(static_cast<char>(v >> 16));
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}

// length, type, data, then the CRC-32 of type and data.
void AppendChunk(std::string& out, const char type[4], const std::string& data) {
  AppendU32(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.append(type, 4);
  out.append(data);
  const auto* crc_bytes = reinterpret_cast<const Bytef*>(out.data() + type_at);
  const uLong crc = crc32(crc32(0L, Z_NULL, 0), crc_bytes, static_cast<uInt>(4 + data.size()));
  AppendU32(out, static_cast<uint32_t>(crc));
}

// Filters one row into `out` (filter byte first) with None or Sub, whichever has the smaller sum
// of absolute values when the bytes are read as signed.
void FilterRow(const uint8_t* row, size_t row_bytes, std::string& out) {
  uint64_t cost_none = 0, cost_sub = 0;
  for (size_t i = 0; i < row_bytes; ++i) {
    const uint8_t sub = static_cast<uint8_t>(row[i] - (i >= 3 ? row[i - 3] : 0));
    cost_none += std::abs(static_cast<int8_t>(row[i]));
    cost_sub += std::abs(static_cast<int8_t>(sub));
  }
  const bool use_sub = cost_sub < cost_none;
  out.push_back(static_cast<char>(use_sub ? 1 : 0));
  for (size_t i = 0; i < row_bytes; ++i) {
    const uint8_t left = (use_sub && i >= 3) ? row[i - 3] : 0;
    out.push_back(static_cast<char>(static_cast<uint8_t>(row[i] - left)));
  }
}

}  // namespace

StatusOr<std::string> EncodePng(int width, int height, const std::vector<uint8_t>& rgb) {
  TANDEM_CHECK_MSG(width > 0 && height > 0, "PNG size must be positive, found ", width, "x",
                   height);
  const size_t row_bytes = static_cast<size_t>(width) * 3;
  TANDEM_CHECK_MSG(rgb.size() == row_bytes * height, "expected ", row_bytes * height,
                   " RGB bytes for ", width, "x", height, ", found ", rgb.size());

  std::string raw;  // [height, 1 + width * 3]: filter byte, then the filtered row
  raw.reserve((row_bytes + 1) * height);
  for (int y = 0; y < height; ++y) FilterRow(rgb.data() + row_bytes * y, row_bytes, raw);

  uLongf packed_size = compressBound(static_cast<uLong>(raw.size()));
  std::string packed(packed_size, '\0');
  const int rc = compress2(reinterpret_cast<Bytef*>(packed.data()), &packed_size,
                           reinterpret_cast<const Bytef*>(raw.data()),
                           static_cast<uLong>(raw.size()), Z_DEFAULT_COMPRESSION);
  if (rc != Z_OK) {
    return InternalError(StrCat("zlib compress2 failed with code ", rc, " on ", raw.size(),
                                " bytes of a ", width, "x", height, " image"));
  }
  packed.resize(packed_size);

  std::string ihdr;
  AppendU32(ihdr, static_cast<uint32_t>(width));
  AppendU32(ihdr, static_cast<uint32_t>(height));
  ihdr.push_back(8);  // bits per channel
  ihdr.push_back(2);  // colour type: RGB
  ihdr.push_back(0);  // compression: deflate
  ihdr.push_back(0);  // filter method: adaptive (types 0-4)
  ihdr.push_back(0);  // no interlace

  std::string out(kSignature, 8);
  AppendChunk(out, "IHDR", ihdr);
  AppendChunk(out, "IDAT", packed);
  AppendChunk(out, "IEND", "");
  return out;
}

Status WritePngFile(const std::string& path, int width, int height,
                    const std::vector<uint8_t>& rgb) {
  TANDEM_ASSIGN_OR_RETURN(const std::string bytes, EncodePng(width, height, rgb));
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return NotFoundError(
        StrCat("cannot open ", tmp, " for writing the plot: ", std::strerror(errno)));
  }
  const bool written = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!written || !closed) {
    std::remove(tmp.c_str());
    return InternalError(StrCat("writing ", bytes.size(), " bytes to ", tmp, " failed"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return InternalError(StrCat("renaming ", tmp, " to ", path, " failed: ", ec.message()));
  }
  return Status::Ok();
}

}  // namespace tandem::trainer::internal
