// Reed-Solomon erasure coding of snapshot bytes (ISA-L) and the framed fragments agents exchange.
//
// An object (one node's snapshot image) is split into k data fragments of equal, 64-byte padded
// size; m parity fragments are computed from them so that any k of the k+m fragments rebuild the
// object. The code is systematic: the data fragments are the object's bytes. m > 1 uses a Cauchy
// generator matrix (every k x k submatrix is invertible); m == 1 uses plain XOR parity.
//
// A framed fragment is a 64-byte FragmentHeader followed by its payload (layout in
// docs/formats.md). Both the header and the payload carry a CRC-32 (zlib's polynomial); a fragment
// whose header or payload does not check out is treated as missing by DecodeFragments.
//
//   TANDEM_ASSIGN_OR_RETURN(ErasureCoder coder, ErasureCoder::Create(/*k=*/4, /*m=*/2));
//   TANDEM_ASSIGN_OR_RETURN(auto fragments, EncodeFragments(coder, bytes, version, node));
//   ... send fragment i to node (node + i) % (k + m), lose up to m of them ...
//   TANDEM_ASSIGN_OR_RETURN(std::vector<uint8_t> back, DecodeFragments(surviving));
//
// Thread-safety: an ErasureCoder is immutable after Create; its methods may run concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "core/status.h"

namespace tandem::checkpoint {

inline constexpr int kMaxErasureFragments = 32;  // k + m <= 32
inline constexpr size_t kFragmentAlignBytes = 64;  // payloads are padded to a multiple of this

class ErasureCoder {
 public:
  // 1 <= k, 1 <= m, k + m <= kMaxErasureFragments; InvalidArgument otherwise.
  static StatusOr<ErasureCoder> Create(int k, int m);

  int k() const { return k_; }
  int m() const { return m_; }
  int n() const { return k_ + m_; }

  // Computes parity[0..m) from data[0..k), every buffer `fragment_bytes` long.
  void Encode(const uint8_t* const* data, uint8_t* const* parity, size_t fragment_bytes) const;

  // fragments[0..n): the entries with present[i] are inputs; every other one is overwritten with
  // its rebuilt content (data or parity). Needs at least k present; DataLoss otherwise.
  Status Reconstruct(uint8_t* const* fragments, const bool* present, size_t fragment_bytes) const;

 private:
  ErasureCoder(int k, int m);
  int k_ = 0;
  int m_ = 0;
  std::vector<uint8_t> matrix_;  // [n, k]: identity on top, then the m parity rows
  std::vector<uint8_t> tables_;  // ISA-L expanded tables of the parity rows: 32 * k * m bytes
};

// On-the-wire header of a fragment: 64 bytes, little-endian, no implicit padding.
struct FragmentHeader {
  uint32_t magic;             // kFragmentMagic
  uint16_t format_version;    // kFragmentFormatVersion
  uint16_t header_bytes;      // sizeof(FragmentHeader)
  uint64_t snapshot_version;  // the snapshot version the object belongs to
  uint32_t owner_node;        // the node whose snapshot this is
  uint16_t index;             // 0..k-1 data, k..k+m-1 parity
  uint8_t k;
  uint8_t m;
  uint64_t payload_bytes;     // bytes after the header (a multiple of kFragmentAlignBytes)
  uint64_t object_bytes;      // length of the whole object before padding
  uint32_t payload_crc32;     // CRC-32 of the payload
  uint8_t reserved[16];       // zero
  uint32_t header_crc32;      // CRC-32 of the 60 bytes before this field
};
static_assert(sizeof(FragmentHeader) == 64, "FragmentHeader is a fixed 64-byte wire format");
inline constexpr uint32_t kFragmentMagic = 0x52464554;  // "TEFR" in memory order
inline constexpr uint16_t kFragmentFormatVersion = 1;

// CRC-32 (zlib polynomial, ISA-L implementation): Crc32(0, ...) equals zlib's crc32(0, ...).
// Buffers of 256 MiB and more are split over up to 16 threads and the pieces joined with zlib's
// crc32_combine (a 13 GB snapshot slot in about a tenth of the single-core time).
uint32_t Crc32(uint32_t seed, const void* data, size_t num_bytes);

// Splits `object` into coder.k() data fragments, computes coder.m() parity fragments, and frames
// all k+m with headers naming `snapshot_version` and `owner_node`. Element i is fragment i.
StatusOr<std::vector<std::vector<uint8_t>>> EncodeFragments(const ErasureCoder& coder,
                                                            std::span<const uint8_t> object,
                                                            uint64_t snapshot_version,
                                                            uint32_t owner_node);

// Checks a framed fragment (magic, format, sizes, both CRCs) and returns its header. DataLoss
// naming the failed check otherwise.
StatusOr<FragmentHeader> ParseFragment(std::span<const uint8_t> fragment);

// Rebuilds the object from any framed fragments of one (owner, version): corrupt ones are
// skipped, duplicates ignored. DataLoss when fewer than k valid fragments remain (the message
// lists the valid and corrupt indices); InvalidArgument when valid fragments disagree on owner,
// version, k, m or sizes.
StatusOr<std::vector<uint8_t>> DecodeFragments(std::span<const std::span<const uint8_t>> fragments);

}  // namespace tandem::checkpoint
