// A minimal PNG encoder for the plot renderer: 8-bit RGB, no interlacing, one IDAT chunk
// compressed with zlib, each row filtered with None (0) or Sub (1), whichever the usual
// minimum-sum-of-absolute-differences heuristic prefers.
//
// Thread-safety: stateless functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::trainer::internal {

// The PNG file bytes of an image. `rgb` is row-major [height, width, 3]; a size that does not match
// is a programmer error. Fails (Internal) only when zlib does.
StatusOr<std::string> EncodePng(int width, int height, const std::vector<uint8_t>& rgb);

// Encodes and writes to `path` through a temporary file renamed into place, so a viewer never
// sees half a file.
Status WritePngFile(const std::string& path, int width, int height,
                    const std::vector<uint8_t>& rgb);

}  // namespace tandem::trainer::internal
