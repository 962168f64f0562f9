// Layout arithmetic of the universal checkpoint, independent of HDF5 calls: row blocks (= HDF5
// chunks = CRC blocks), the contiguous runs a hyperslab covers in row-major order, CRC pieces
// and their combination, and n-dimensional box copies between host buffers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/tensor.h"

namespace tandem::checkpoint::internal {

// CRC-32 (zlib's polynomial, as zlib.crc32) of `num_bytes` bytes, continuing from `crc`.
uint32_t Crc32(uint32_t crc, const void* data, size_t num_bytes);
// CRC of A then B from crc(A), crc(B) and B's length (zlib's crc32_combine).
uint32_t Crc32Combine(uint32_t crc_a, uint32_t crc_b, int64_t num_bytes_b);

// Elements of one row (product of dims 1..), 1 for a vector.
int64_t RowElems(const Shape& shape);
// Rows per chunk / CRC block: about `chunk_bytes` of f32, at least 1, at most shape[0].
int64_t BlockRows(const Shape& shape, int64_t chunk_bytes);

// One contiguous range of a tensor's elements in row-major order, within one block, with the
// CRC of its f32 bytes. `dataset` indexes the sender's (shard, dataset) list.
struct Piece {
  int64_t start = 0;   // element offset in the logical tensor
  int64_t length = 0;  // elements
  uint32_t crc = 0;
  int32_t dataset = 0;
};

// Appends the pieces of a count-shaped contiguous f32 buffer `data` holding box `offset/count`
// of `shape`, split at multiples of `block_elems`, in increasing start order.
void AppendPieces(const Shape& shape, const Shape& offset, const Shape& count, const float* data,
                  int64_t block_elems, int32_t dataset, std::vector<Piece>* out);

// From pieces sorted by start that tile [0, numel) exactly: per-block CRCs and the whole CRC.
// InvalidArgument naming `what` on a gap or overlap.
Status CombinePieces(const std::vector<Piece>& sorted, int64_t numel, int64_t block_elems,
                     const std::string& what, std::vector<uint32_t>* block_crcs,
                     uint32_t* whole_crc);

// Copies box `count` from `src` (shape src_shape, starting at src_offset) to `dst` (shape
// dst_shape, starting at dst_offset). f32, row-major, no overlap.
void CopyBox(float* dst, const Shape& dst_shape, const Shape& dst_offset, const float* src,
             const Shape& src_shape, const Shape& src_offset, const Shape& count);

// True when `slab` lies inside `shape` (same rank, non-negative offsets and counts).
bool SlabInside(const Shape& shape, const Shape& offset, const Shape& count);

}  // namespace tandem::checkpoint::internal
