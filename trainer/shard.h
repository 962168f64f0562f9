// Token shards: one file of token ids, a document index and an optional loss mask.
//
// Format (little-endian, version 1; the full table is in docs/formats.md, "Token shards"):
//
//   offset  size  field
//   0       8     magic "TDMSHRD1"
//   8       4     format version (u32) = 1
//   12      4     token width in bytes (u32): 2 (u16 ids) when vocab_size <= 65536, else 4
//   16      8     vocab size (u64)
//   24      8     number of tokens N (u64)
//   32      8     number of documents D (u64)
//   40      4     flags (u32): bit 0 has loss mask, bit 1 first document continues the
//                 previous shard's last one (a document split at a shard boundary)
//   44      4     CRC32 (zlib) of every byte after the header (payload, padding included)
//   48      4     CRC32 (zlib) of header bytes [0, 48)
//   52      12    zero
//   64      N*w   tokens
//   ...     pad   zeros to a multiple of 8 bytes
//   ...     8*(D+1)  document index: u64 start of each document, then N
//   ...     N     loss mask if flag bit 0: one byte per token, 1 = train on predicting this token
//                 (it is a target), 0 = no loss
//
// The file size must equal exactly the size these fields imply. Documents are non-empty: the
// index starts at 0, strictly increases and ends at N (D = 0 only when N = 0).
//
// WriteShard writes `path`.tmp, fsyncs it, renames it to `path` and fsyncs the directory, so a
// reader sees the old file or the complete new one. OpenShard maps the file read-only and checks
// everything above (sizes, CRCs, the index, every token < vocab_size) before returning.
//
// A Shard owns its mapping (move-only); its accessors are const and safe from several threads.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "core/status.h"

namespace tandem::trainer {

inline constexpr char kShardMagic[8] = {'T', 'D', 'M', 'S', 'H', 'R', 'D', '1'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;
inline constexpr uint32_t kShardFlagLossMask = 1u << 0;
inline constexpr uint32_t kShardFlagContinues = 1u << 1;

// 2 when every id of a vocabulary of this size fits a u16, else 4.
inline uint32_t ShardTokenWidth(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

struct ShardWriteOptions {
  // The first document continues the last document of the previous shard (see the flags).
  bool first_doc_continues = false;
};

// Writes a shard. `doc_starts` holds the start of each document (the end is tokens.size());
// `loss_mask` is empty (no mask) or one 0/1 byte per token. InvalidArgument for a token outside
// [0, vocab_size), a bad index or a mask of the wrong length; Internal for I/O failures, naming
// `path`.
Status WriteShard(const std::string& path, std::span<const int32_t> tokens,
                  std::span<const int64_t> doc_starts, std::span<const uint8_t> loss_mask,
                  int64_t vocab_size, const ShardWriteOptions& options = {});

class Shard {
 public:
  Shard() = default;
  ~Shard();
  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&& other) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const std::string& path() const { return path_; }
  int64_t vocab_size() const { return vocab_size_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_docs() const { return num_docs_; }
  uint32_t token_width() const { return token_width_; }
  uint32_t flags() const { return flags_; }
  bool has_loss_mask() const { return (flags_ & kShardFlagLossMask) != 0; }
  bool first_doc_continues() const { return (flags_ & kShardFlagContinues) != 0; }

  // Token i, 0 <= i < num_tokens().
  int32_t token(int64_t i) const {
    return token_width_ == 2 ? static_cast<int32_t>(tokens16_[i])
                             : static_cast<int32_t>(tokens32_[i]);
  }
  // Copies tokens [start, start + count) into `out` (as i32).
  void CopyTokens(int32_t* out, int64_t start, int64_t count) const;
  // num_docs() + 1 offsets: the start of each document, then num_tokens().
  std::span<const uint64_t> doc_index() const { return doc_index_; }
  // One byte per token (1 = has loss); empty when the shard has no mask (every token has loss).
  std::span<const uint8_t> loss_mask() const { return loss_mask_; }

 private:
  friend StatusOr<Shard> OpenShard(const std::string& path);
  void Release();

  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  int64_t vocab_size_ = 0;
  int64_t num_tokens_ = 0;
  int64_t num_docs_ = 0;
  uint32_t token_width_ = 2;
  uint32_t flags_ = 0;
  const uint16_t* tokens16_ = nullptr;
  const uint32_t* tokens32_ = nullptr;
  std::span<const uint64_t> doc_index_;
  std::span<const uint8_t> loss_mask_;
};

// Maps and validates a shard. Errors name the file and the problem: NotFound (no file), DataLoss
// (truncated, bad magic, size mismatch, CRC mismatch, bad document index, token >= vocab_size),
// Unimplemented (a newer format version).
StatusOr<Shard> OpenShard(const std::string& path);

}  // namespace tandem::trainer
