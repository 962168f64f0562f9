#include "checkpoint/internal/h5_layout.h"

#include <isa-l.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>

namespace tandem::checkpoint::internal {

uint32_t Crc32(uint32_t crc, const void* data, size_t num_bytes) {
  // ISA-L's reflected gzip CRC equals zlib's crc32 (checked by a test) and is several times
  // faster; it takes 64-bit lengths.
  return crc32_gzip_refl(crc, static_cast<const unsigned char*>(data), num_bytes);
}

uint32_t Crc32Combine(uint32_t crc_a, uint32_t crc_b, int64_t num_bytes_b) {
  return static_cast<uint32_t>(crc32_combine(crc_a, crc_b, static_cast<z_off_t>(num_bytes_b)));
}

int64_t RowElems(const Shape& shape) {
  int64_t n = 1;
  for (size_t d = 1; d < shape.size(); ++d) n *= shape[d];
  return n;
}

int64_t BlockRows(const Shape& shape, int64_t chunk_bytes) {
  const int64_t row_bytes = RowElems(shape) * static_cast<int64_t>(sizeof(float));
  const int64_t rows = std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(row_bytes, 1));
  return std::min(rows, shape[0]);
}

void AppendPieces(const Shape& shape, const Shape& offset, const Shape& count, const float* data,
                  int64_t block_elems, int32_t dataset, std::vector<Piece>* out) {
  const int n = static_cast<int>(shape.size());
  for (int d = 0; d < n; ++d) {
    if (count[d] == 0) return;
  }
  // k: the outermost dimension of a run; every dimension after it is taken whole.
  int k = n - 1;
  while (k > 0 && count[k] == shape[k]) --k;
  Shape strides(n, 1);
  for (int d = n - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
  const int64_t run = count[k] * strides[k];
  int64_t num_runs = 1;
  for (int d = 0; d < k; ++d) num_runs *= count[d];
  Shape idx(k, 0);  // index within count[0..k)
  for (int64_t r = 0; r < num_runs; ++r) {
    int64_t start = offset[k] * strides[k];
    for (int d = 0; d < k; ++d) start += (offset[d] + idx[d]) * strides[d];
    const float* src = data + r * run;
    // Split the run at block boundaries.
    int64_t pos = 0;
    while (pos < run) {
      const int64_t abs = start + pos;
      const int64_t block_end = (abs / block_elems + 1) * block_elems;
      const int64_t len = std::min(run - pos, block_end - abs);
      Piece p;
      p.start = abs;
      p.length = len;
      p.crc = Crc32(0, src + pos, static_cast<size_t>(len) * sizeof(float));
      p.dataset = dataset;
      out->push_back(p);
      pos += len;
    }
    for (int d = k - 1; d >= 0; --d) {  // next index, last dimension fastest
      if (++idx[d] < count[d]) break;
      idx[d] = 0;
    }
  }
}

Status CombinePieces(const std::vector<Piece>& sorted, int64_t numel, int64_t block_elems,
                     const std::string& what, std::vector<uint32_t>* block_crcs,
                     uint32_t* whole_crc) {
  const int64_t num_blocks = (numel + block_elems - 1) / block_elems;
  block_crcs->assign(num_blocks, 0);
  int64_t pos = 0;
  int64_t block = -1;
  uint32_t acc = 0;
  for (const Piece& p : sorted) {
    if (p.start > pos) {
      return InvalidArgumentError(StrCat(what, ": elements [", pos, ", ", p.start,
                                         ") are not covered by any rank's shard"));
    }
    if (p.start < pos) {
      return InvalidArgumentError(StrCat(what, ": elements [", p.start, ", ",
                                         std::min(pos, p.start + p.length),
                                         ") are covered by more than one shard"));
    }
    const int64_t b = p.start / block_elems;
    if (b != block) {
      if (block >= 0) (*block_crcs)[block] = acc;
      block = b;
      acc = p.crc;
    } else {
      acc = Crc32Combine(acc, p.crc, p.length * static_cast<int64_t>(sizeof(float)));
    }
    pos = p.start + p.length;
  }
  if (block >= 0) (*block_crcs)[block] = acc;
  if (pos != numel) {
    return InvalidArgumentError(
        StrCat(what, ": elements [", pos, ", ", numel, ") are not covered by any rank's shard"));
  }
  uint32_t whole = 0;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t len = std::min(block_elems, numel - b * block_elems);
    whole = b == 0
                ? (*block_crcs)[0]
                : Crc32Combine(whole, (*block_crcs)[b], len * static_cast<int64_t>(sizeof(float)));
  }
  *whole_crc = whole;
  return Status::Ok();
}

void CopyBox(float* dst, const Shape& dst_shape, const Shape& dst_offset, const float* src,
             const Shape& src_shape, const Shape& src_offset, const Shape& count) {
  const int n = static_cast<int>(count.size());
  for (int d = 0; d < n; ++d) {
    if (count[d] == 0) return;
  }
  Shape ds(n, 1), ss(n, 1);
  for (int d = n - 2; d >= 0; --d) {
    ds[d] = ds[d + 1] * dst_shape[d + 1];
    ss[d] = ss[d + 1] * src_shape[d + 1];
  }
  const int64_t inner = count[n - 1];
  int64_t outer = 1;
  for (int d = 0; d < n - 1; ++d) outer *= count[d];
  Shape idx(n, 0);
  for (int64_t r = 0; r < outer; ++r) {
    int64_t so = 0, dof = 0;
    for (int d = 0; d < n; ++d) {
      so += (src_offset[d] + idx[d]) * ss[d];
      dof += (dst_offset[d] + idx[d]) * ds[d];
    }
    std::memcpy(dst + dof, src + so, static_cast<size_t>(inner) * sizeof(float));
    for (int d = n - 2; d >= 0; --d) {
      if (++idx[d] < count[d]) break;
      idx[d] = 0;
    }
  }
}

bool SlabInside(const Shape& shape, const Shape& offset, const Shape& count) {
  if (offset.size() != shape.size() || count.size() != shape.size()) return false;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (offset[d] < 0 || count[d] < 0 || offset[d] + count[d] > shape[d]) return false;
  }
  return true;
}

}  // namespace tandem::checkpoint::internal
