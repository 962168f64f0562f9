#include "trainer/shard.h"

#include <sys/mman.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <utility>
#include <vector>

#include "trainer/internal/data_io.h"

namespace tandem::trainer {
namespace {

static_assert(std::endian::native == std::endian::little, "shards are little-endian");

// Byte layout implied by a header; every size checked against overflow by the caller.
struct Layout {
  uint64_t tokens_bytes = 0;
  uint64_t pad_bytes = 0;
  uint64_t index_offset = 0;
  uint64_t index_bytes = 0;
  uint64_t mask_offset = 0;
  uint64_t mask_bytes = 0;
  uint64_t file_bytes = 0;
};

// Returns false when the sizes overflow 63 bits (no real file can be that large).
bool ComputeLayout(uint64_t num_tokens, uint64_t num_docs, uint32_t width, bool has_mask,
                   Layout* out) {
  constexpr uint64_t kMax = uint64_t{1} << 60;
  if (num_tokens > kMax / 8 || num_docs > kMax / 8) return false;
  Layout l;
  l.tokens_bytes = num_tokens * width;
  l.pad_bytes = (8 - l.tokens_bytes % 8) % 8;
  l.index_offset = kShardHeaderBytes + l.tokens_bytes + l.pad_bytes;
  l.index_bytes = (num_docs + 1) * 8;
  l.mask_offset = l.index_offset + l.index_bytes;
  l.mask_bytes = has_mask ? num_tokens : 0;
  l.file_bytes = l.mask_offset + l.mask_bytes;
  *out = l;
  return true;
}

template <typename T>
void PutLe(uint8_t* dst, T v) {
  std::memcpy(dst, &v, sizeof(T));
}
template <typename T>
T GetLe(const uint8_t* src) {
  T v;
  std::memcpy(&v, src, sizeof(T));
  return v;
}

uint32_t Crc32(uint32_t crc, const void* data, uint64_t num_bytes) {
  const auto* p = static_cast<const Bytef*>(data);
  while (num_bytes > 0) {
    const uInt chunk = static_cast<uInt>(std::min<uint64_t>(num_bytes, 1u << 30));
    crc = static_cast<uint32_t>(crc32(crc, p, chunk));
    p += chunk;
    num_bytes -= chunk;
  }
  return crc;
}

Status ValidateWriteArgs(const std::string& path, std::span<const int32_t> tokens,
                         std::span<const int64_t> doc_starts, std::span<const uint8_t> loss_mask,
                         int64_t vocab_size) {
  const std::string where = "shard '" + path + "': ";
  if (vocab_size <= 0 || vocab_size > (int64_t{1} << 31)) {
    return InvalidArgumentError(StrCat(where, "vocab_size must be in [1, 2^31], got ", vocab_size));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return InvalidArgumentError(StrCat(where, "token ", i, " is ", tokens[i],
                                         ", outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n > 0 && doc_starts.empty()) {
    return InvalidArgumentError(where + "tokens without a document (doc_starts is empty)");
  }
  for (size_t d = 0; d < doc_starts.size(); ++d) {
    const int64_t lo = d == 0 ? 0 : doc_starts[d - 1] + 1;
    if ((d == 0 && doc_starts[0] != 0) || doc_starts[d] < lo || doc_starts[d] >= n) {
      return InvalidArgumentError(StrCat(where, "document ", d, " starts at ", doc_starts[d],
                                         "; starts must begin at 0, strictly increase and be < ", n,
                                         " (documents are non-empty)"));
    }
  }
  if (!loss_mask.empty() && loss_mask.size() != tokens.size()) {
    return InvalidArgumentError(StrCat(where, "loss mask has ", loss_mask.size(),
                                       " bytes, expected one per token (", n, ")"));
  }
  for (size_t i = 0; i < loss_mask.size(); ++i) {
    if (loss_mask[i] > 1) {
      return InvalidArgumentError(
          StrCat(where, "loss mask byte ", i, " is ", int{loss_mask[i]}, ", expected 0 or 1"));
    }
  }
  return Status::Ok();
}

// Writes the payload sections to `w`, returning their CRC32.
Status WritePayload(internal::FileWriter& w, std::span<const int32_t> tokens,
                    std::span<const int64_t> doc_starts, std::span<const uint8_t> loss_mask,
                    uint32_t width, const Layout& layout, uint32_t* crc) {
  uint32_t c = Crc32(0, nullptr, 0);
  constexpr size_t kChunk = 1 << 16;
  std::vector<uint8_t> buf(kChunk * 4);
  for (size_t i = 0; i < tokens.size(); i += kChunk) {
    const size_t count = std::min(kChunk, tokens.size() - i);
    for (size_t k = 0; k < count; ++k) {
      if (width == 2) {
        PutLe<uint16_t>(&buf[k * 2], static_cast<uint16_t>(tokens[i + k]));
      } else {
        PutLe<uint32_t>(&buf[k * 4], static_cast<uint32_t>(tokens[i + k]));
      }
    }
    c = Crc32(c, buf.data(), count * width);
    TANDEM_RETURN_IF_ERROR(w.Write(buf.data(), count * width));
  }
  std::vector<uint8_t> tail(layout.pad_bytes + layout.index_bytes, 0);
  uint8_t* index = tail.data() + layout.pad_bytes;
  for (size_t d = 0; d < doc_starts.size(); ++d) {
    PutLe<uint64_t>(index + d * 8, static_cast<uint64_t>(doc_starts[d]));
  }
  PutLe<uint64_t>(index + doc_starts.size() * 8, static_cast<uint64_t>(tokens.size()));
  c = Crc32(c, tail.data(), tail.size());
  TANDEM_RETURN_IF_ERROR(w.Write(tail.data(), tail.size()));
  c = Crc32(c, loss_mask.data(), loss_mask.size());
  TANDEM_RETURN_IF_ERROR(w.Write(loss_mask.data(), loss_mask.size()));
  *crc = c;
  return Status::Ok();
}

void EncodeHeader(uint8_t* h, int64_t vocab_size, uint64_t num_tokens, uint64_t num_docs,
                  uint32_t width, uint32_t flags, uint32_t payload_crc) {
  std::memset(h, 0, kShardHeaderBytes);
  std::memcpy(h, kShardMagic, 8);
  PutLe<uint32_t>(h + 8, kShardVersion);
  PutLe<uint32_t>(h + 12, width);
  PutLe<uint64_t>(h + 16, static_cast<uint64_t>(vocab_size));
  PutLe<uint64_t>(h + 24, num_tokens);
  PutLe<uint64_t>(h + 32, num_docs);
  PutLe<uint32_t>(h + 40, flags);
  PutLe<uint32_t>(h + 44, payload_crc);
  PutLe<uint32_t>(h + 48, Crc32(Crc32(0, nullptr, 0), h, 48));
}

}  // namespace

Status WriteShard(const std::string& path, std::span<const int32_t> tokens,
                  std::span<const int64_t> doc_starts, std::span<const uint8_t> loss_mask,
                  int64_t vocab_size, const ShardWriteOptions& options) {
  TANDEM_RETURN_IF_ERROR(ValidateWriteArgs(path, tokens, doc_starts, loss_mask, vocab_size));
  const uint32_t width = ShardTokenWidth(vocab_size);
  const bool has_mask = !loss_mask.empty();
  Layout layout;
  TANDEM_CHECK(ComputeLayout(tokens.size(), doc_starts.size(), width, has_mask, &layout));
  uint32_t flags = has_mask ? kShardFlagLossMask : 0;
  if (options.first_doc_continues) flags |= kShardFlagContinues;

  const std::string tmp = path + ".tmp";
  TANDEM_ASSIGN_OR_RETURN(internal::FileWriter w, internal::FileWriter::Create(tmp));
  uint8_t header[kShardHeaderBytes] = {};
  TANDEM_RETURN_IF_ERROR(w.Write(header, sizeof(header)));  // rewritten once the CRC is known
  uint32_t crc = 0;
  TANDEM_RETURN_IF_ERROR(WritePayload(w, tokens, doc_starts, loss_mask, width, layout, &crc));
  EncodeHeader(header, vocab_size, tokens.size(), doc_starts.size(), width, flags, crc);
  TANDEM_RETURN_IF_ERROR(w.WriteAt(0, header, sizeof(header)));
  return w.CommitAs(path);
}

Shard::~Shard() { Release(); }

Shard::Shard(Shard&& o) noexcept { *this = std::move(o); }

Shard& Shard::operator=(Shard&& o) noexcept {
  if (this == &o) return *this;
  Release();
  path_ = std::move(o.path_);
  map_ = std::exchange(o.map_, nullptr);
  map_bytes_ = std::exchange(o.map_bytes_, 0);
  vocab_size_ = o.vocab_size_;
  num_tokens_ = o.num_tokens_;
  num_docs_ = o.num_docs_;
  token_width_ = o.token_width_;
  flags_ = o.flags_;
  tokens16_ = std::exchange(o.tokens16_, nullptr);
  tokens32_ = std::exchange(o.tokens32_, nullptr);
  doc_index_ = std::exchange(o.doc_index_, {});
  loss_mask_ = std::exchange(o.loss_mask_, {});
  return *this;
}

void Shard::Release() {
  if (map_ != nullptr) munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

void Shard::CopyTokens(int32_t* out, int64_t start, int64_t count) const {
  TANDEM_CHECK_MSG(start >= 0 && count >= 0 && start + count <= num_tokens_, "tokens [", start,
                   ", ", start + count, ") of shard with ", num_tokens_);
  if (token_width_ == 2) {
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int32_t>(tokens16_[start + i]);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int32_t>(tokens32_[start + i]);
  }
}

namespace {

// Checks the header fields; fills `layout`.
Status CheckHeader(const std::string& path, const uint8_t* h, uint64_t file_bytes, Layout* layout) {
  const std::string where = "shard '" + path + "': ";
  if (std::memcmp(h, kShardMagic, 8) != 0) {
    return DataLossError(where + "bad magic (expected \"TDMSHRD1\"); not a tandem token shard");
  }
  const uint32_t version = GetLe<uint32_t>(h + 8);
  if (version != kShardVersion) {
    return UnimplementedError(
        StrCat(where, "format version ", version, ", this build reads ", kShardVersion));
  }
  const uint32_t header_crc = Crc32(Crc32(0, nullptr, 0), h, 48);
  if (header_crc != GetLe<uint32_t>(h + 48)) {
    return DataLossError(StrCat(where, "header CRC mismatch (stored ", GetLe<uint32_t>(h + 48),
                                ", computed ", header_crc, "): corrupted header"));
  }
  const uint32_t width = GetLe<uint32_t>(h + 12);
  const uint64_t vocab = GetLe<uint64_t>(h + 16);
  if (vocab == 0 || vocab > (uint64_t{1} << 31) ||
      width != ShardTokenWidth(static_cast<int64_t>(vocab))) {
    return DataLossError(StrCat(where, "token width ", width, " does not fit vocab size ", vocab,
                                " (2 bytes when vocab <= 65536, else 4)"));
  }
  const uint64_t num_tokens = GetLe<uint64_t>(h + 24);
  const uint64_t num_docs = GetLe<uint64_t>(h + 32);
  const uint32_t flags = GetLe<uint32_t>(h + 40);
  if ((flags & ~(kShardFlagLossMask | kShardFlagContinues)) != 0) {
    return DataLossError(StrCat(where, "unknown flags 0x", std::hex, flags));
  }
  if (!ComputeLayout(num_tokens, num_docs, width, (flags & kShardFlagLossMask) != 0, layout)) {
    return DataLossError(StrCat(where, "impossible sizes in header: ", num_tokens, " tokens, ",
                                num_docs, " documents"));
  }
  if (file_bytes < layout->file_bytes) {
    return DataLossError(StrCat(where, "truncated: the header describes ", layout->file_bytes,
                                " bytes (", num_tokens, " tokens, ", num_docs,
                                " documents), the file has ", file_bytes));
  }
  if (file_bytes > layout->file_bytes) {
    return DataLossError(StrCat(where, file_bytes - layout->file_bytes,
                                " unexpected trailing bytes after the ", layout->file_bytes,
                                " the header describes"));
  }
  return Status::Ok();
}

Status CheckPayload(const Shard& s) {
  const std::string where = "shard '" + s.path() + "': ";
  const auto index = s.doc_index();
  const int64_t n = s.num_tokens();
  if (index[0] != 0 || index.back() != static_cast<uint64_t>(n) || (n > 0 && s.num_docs() == 0)) {
    return DataLossError(StrCat(where, "document index must run from 0 to ", n, ", found ",
                                index[0], " .. ", index.back()));
  }
  for (size_t d = 1; d < index.size(); ++d) {
    if (index[d] <= index[d - 1]) {
      return DataLossError(StrCat(where, "document index not strictly increasing: document ", d - 1,
                                  " spans [", index[d - 1], ", ", index[d], ")"));
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (s.token(i) < 0 || s.token(i) >= s.vocab_size()) {
      return DataLossError(StrCat(where, "token ", i, " is ", static_cast<uint32_t>(s.token(i)),
                                  ", >= vocab size ", s.vocab_size()));
    }
  }
  const auto mask = s.loss_mask();
  for (size_t i = 0; i < mask.size(); ++i) {
    if (mask[i] > 1) {
      return DataLossError(
          StrCat(where, "loss mask byte ", i, " is ", int{mask[i]}, ", expected 0 or 1"));
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<Shard> OpenShard(const std::string& path) {
  TANDEM_ASSIGN_OR_RETURN(internal::MappedFile file, internal::MappedFile::Open(path));
  const uint8_t* base = file.data();
  if (file.size() < kShardHeaderBytes) {
    return DataLossError(StrCat("shard '", path, "': truncated: ", file.size(),
                                " bytes, the header alone needs ", kShardHeaderBytes));
  }
  Layout layout;
  TANDEM_RETURN_IF_ERROR(CheckHeader(path, base, file.size(), &layout));
  const uint32_t stored_crc = GetLe<uint32_t>(base + 44);
  const uint32_t crc =
      Crc32(Crc32(0, nullptr, 0), base + kShardHeaderBytes, layout.file_bytes - kShardHeaderBytes);
  if (crc != stored_crc) {
    return DataLossError(StrCat("shard '", path, "': payload CRC mismatch (stored ", stored_crc,
                                ", computed ", crc, "): the tokens, index or mask are corrupted"));
  }
  Shard s;
  s.path_ = path;
  s.vocab_size_ = static_cast<int64_t>(GetLe<uint64_t>(base + 16));
  s.num_tokens_ = static_cast<int64_t>(GetLe<uint64_t>(base + 24));
  s.num_docs_ = static_cast<int64_t>(GetLe<uint64_t>(base + 32));
  s.token_width_ = GetLe<uint32_t>(base + 12);
  s.flags_ = GetLe<uint32_t>(base + 40);
  const uint8_t* tokens = base + kShardHeaderBytes;
  if (s.token_width_ == 2) {
    s.tokens16_ = reinterpret_cast<const uint16_t*>(tokens);
  } else {
    s.tokens32_ = reinterpret_cast<const uint32_t*>(tokens);
  }
  s.doc_index_ = {reinterpret_cast<const uint64_t*>(base + layout.index_offset),
                  static_cast<size_t>(s.num_docs_ + 1)};
  s.loss_mask_ = {base + layout.mask_offset, static_cast<size_t>(layout.mask_bytes)};
  file.Release(&s.map_, &s.map_bytes_);
  TANDEM_RETURN_IF_ERROR(CheckPayload(s));
  return s;
}

}  // namespace tandem::trainer
