#include "checkpoint/erasure.h"

#include <isa-l/crc.h>
#include <isa-l/erasure_code.h>
#include <isa-l/raid.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <zlib.h>

namespace tandem::checkpoint {
namespace {

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t, FreeDeleter>;

// Zeroed, kFragmentAlignBytes-aligned storage (ISA-L's XOR kernels need 32-byte alignment).
AlignedBytes AllocateAligned(size_t num_bytes) {
  size_t rounded = std::max<size_t>(kFragmentAlignBytes, num_bytes);
  rounded = (rounded + kFragmentAlignBytes - 1) / kFragmentAlignBytes * kFragmentAlignBytes;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(kFragmentAlignBytes, rounded));
  TANDEM_CHECK_MSG(p != nullptr, "out of host memory allocating ", rounded, " bytes");
  std::memset(p, 0, rounded);
  return AlignedBytes(p);
}

bool Aligned32(const void* p) { return reinterpret_cast<uintptr_t>(p) % 32 == 0; }

// out = XOR of srcs, using ISA-L when every pointer and the length allow it.
void XorInto(uint8_t* out, const std::vector<const uint8_t*>& srcs, size_t num_bytes) {
  bool fast = num_bytes % 32 == 0 && num_bytes > 0 && num_bytes <= INT32_MAX && Aligned32(out) &&
              srcs.size() >= 2;
  for (const uint8_t* s : srcs) fast = fast && Aligned32(s);
  if (fast) {
    std::vector<void*> array;
    for (const uint8_t* s : srcs) array.push_back(const_cast<uint8_t*>(s));
    array.push_back(out);
    TANDEM_CHECK(xor_gen(static_cast<int>(array.size()), static_cast<int>(num_bytes),
                         array.data()) == 0);
    return;
  }
  std::memcpy(out, srcs[0], num_bytes);
  for (size_t s = 1; s < srcs.size(); ++s) {
    for (size_t i = 0; i < num_bytes; ++i) out[i] ^= srcs[s][i];
  }
}

// ec_encode_data takes an int length: run it over chunks.
void EncodeRows(int k, int rows, uint8_t* tables, const std::vector<uint8_t*>& srcs,
                const std::vector<uint8_t*>& outs, size_t num_bytes) {
  constexpr size_t kChunk = size_t{1} << 30;
  std::vector<uint8_t*> s(srcs), o(outs);
  for (size_t off = 0; off < num_bytes; off += kChunk) {
    size_t len = std::min(kChunk, num_bytes - off);
    for (int i = 0; i < k; ++i) s[i] = srcs[i] + off;
    for (int i = 0; i < rows; ++i) o[i] = outs[i] + off;
    ec_encode_data(static_cast<int>(len), k, rows, tables, s.data(), o.data());
  }
}

std::string IndexList(const std::vector<int>& v) {
  std::string s;
  for (int i : v) {
    if (!s.empty()) s += ',';
    s += std::to_string(i);
  }
  return s.empty() ? "none" : s;
}

}  // namespace

namespace {

uint32_t Crc32Serial(uint32_t seed, const void* data, size_t num_bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  constexpr size_t kChunk = size_t{1} << 30;  // the ISA-L length is 64-bit, but keep calls bounded
  while (num_bytes > 0) {
    size_t len = std::min(kChunk, num_bytes);
    seed = crc32_gzip_refl(seed, p, len);
    p += len;
    num_bytes -= len;
  }
  return seed;
}

}  // namespace

uint32_t Crc32(uint32_t seed, const void* data, size_t num_bytes) {
  constexpr size_t kMinPiece = size_t{64} << 20;
  const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  const size_t pieces = std::min({cores, size_t{16}, num_bytes / kMinPiece});
  if (pieces < 2) return Crc32Serial(seed, data, num_bytes);
  const auto* p = static_cast<const unsigned char*>(data);
  const size_t piece = (num_bytes + pieces - 1) / pieces;
  std::vector<uint32_t> crc(pieces);
  std::vector<size_t> len(pieces);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < pieces; ++i) {
    const size_t begin = i * piece;
    len[i] = std::min(piece, num_bytes - begin);
    threads.emplace_back([&, i, begin] { crc[i] = Crc32Serial(i == 0 ? seed : 0, p + begin, len[i]); });
  }
  for (std::thread& t : threads) t.join();
  uLong joined = crc[0];
  for (size_t i = 1; i < pieces; ++i) joined = crc32_combine(joined, crc[i], static_cast<z_off_t>(len[i]));
  return static_cast<uint32_t>(joined);
}

ErasureCoder::ErasureCoder(int k, int m) : k_(k), m_(m) {}

StatusOr<ErasureCoder> ErasureCoder::Create(int k, int m) {
  if (k < 1 || m < 1 || k + m > kMaxErasureFragments) {
    return InvalidArgumentError(StrCat("erasure code: expected 1 <= k, 1 <= m, k + m <= ",
                                       kMaxErasureFragments, ", found k=", k, " m=", m));
  }
  ErasureCoder c(k, m);
  const int n = k + m;
  c.matrix_.assign(static_cast<size_t>(n) * k, 0);
  if (m == 1) {
    for (int i = 0; i < k; ++i) c.matrix_[i * k + i] = 1;
    for (int j = 0; j < k; ++j) c.matrix_[k * k + j] = 1;  // XOR parity row
  } else {
    gf_gen_cauchy1_matrix(c.matrix_.data(), n, k);
  }
  c.tables_.resize(32 * static_cast<size_t>(k) * m);
  ec_init_tables(k, m, c.matrix_.data() + static_cast<size_t>(k) * k, c.tables_.data());
  return c;
}

void ErasureCoder::Encode(const uint8_t* const* data, uint8_t* const* parity,
                          size_t fragment_bytes) const {
  if (m_ == 1) {
    XorInto(parity[0], std::vector<const uint8_t*>(data, data + k_), fragment_bytes);
    return;
  }
  std::vector<uint8_t*> srcs(k_), outs(m_);
  for (int i = 0; i < k_; ++i) srcs[i] = const_cast<uint8_t*>(data[i]);
  for (int i = 0; i < m_; ++i) outs[i] = parity[i];
  EncodeRows(k_, m_, const_cast<uint8_t*>(tables_.data()), srcs, outs, fragment_bytes);
}

Status ErasureCoder::Reconstruct(uint8_t* const* fragments, const bool* present,
                                 size_t fragment_bytes) const {
  const int n = k_ + m_;
  std::vector<int> survivors, missing;
  for (int i = 0; i < n; ++i) (present[i] ? survivors : missing).push_back(i);
  if (static_cast<int>(survivors.size()) < k_) {
    return DataLossError(StrCat("erasure code k=", k_, " m=", m_, ": need ", k_,
                                " fragments, found ", survivors.size(), " (present: ",
                                IndexList(survivors), ")"));
  }
  if (missing.empty()) return Status::Ok();
  survivors.resize(k_);
  if (m_ == 1) {  // the one missing fragment is the XOR of all the others
    std::vector<const uint8_t*> srcs;
    for (int s : survivors) srcs.push_back(fragments[s]);
    XorInto(fragments[missing[0]], srcs, fragment_bytes);
    return Status::Ok();
  }
  // Rows of the generator for the survivors, inverted: data = inv * survivors.
  std::vector<uint8_t> sub(static_cast<size_t>(k_) * k_), inv(sub.size());
  for (int r = 0; r < k_; ++r) {
    std::memcpy(&sub[r * k_], &matrix_[static_cast<size_t>(survivors[r]) * k_], k_);
  }
  if (gf_invert_matrix(sub.data(), inv.data(), k_) != 0) {
    return InternalError(StrCat("erasure code k=", k_, " m=", m_,
                                ": generator rows not invertible for survivors ",
                                IndexList(survivors)));
  }
  // Each missing row e: coefficients (generator row e) * inv over the survivors.
  const int rows = static_cast<int>(missing.size());
  std::vector<uint8_t> coeffs(static_cast<size_t>(rows) * k_, 0);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* g = &matrix_[static_cast<size_t>(missing[r]) * k_];
    for (int j = 0; j < k_; ++j) {
      uint8_t acc = 0;
      for (int t = 0; t < k_; ++t) acc ^= gf_mul(g[t], inv[t * k_ + j]);
      coeffs[r * k_ + j] = acc;
    }
  }
  std::vector<uint8_t> tables(32 * static_cast<size_t>(k_) * rows);
  ec_init_tables(k_, rows, coeffs.data(), tables.data());
  std::vector<uint8_t*> srcs(k_), outs(rows);
  for (int i = 0; i < k_; ++i) srcs[i] = fragments[survivors[i]];
  for (int r = 0; r < rows; ++r) outs[r] = fragments[missing[r]];
  EncodeRows(k_, rows, tables.data(), srcs, outs, fragment_bytes);
  return Status::Ok();
}

StatusOr<std::vector<std::vector<uint8_t>>> EncodeFragments(const ErasureCoder& coder,
                                                            std::span<const uint8_t> object,
                                                            uint64_t snapshot_version,
                                                            uint32_t owner_node) {
  const int k = coder.k(), n = coder.n();
  size_t per = (object.size() + k - 1) / k;
  per = std::max<size_t>(kFragmentAlignBytes,
                         (per + kFragmentAlignBytes - 1) / kFragmentAlignBytes * kFragmentAlignBytes);
  // Data goes straight into the framed outputs and parity is computed in place: one copy of the
  // object, no staging buffer (first touches of fresh pages dominate the cost).
  std::vector<std::vector<uint8_t>> out(n);
  std::vector<uint8_t*> payload(n);
  for (int i = 0; i < n; ++i) {
    out[i].resize(sizeof(FragmentHeader) + per);
    payload[i] = out[i].data() + sizeof(FragmentHeader);
    if (i < k) {
      const size_t off = per * i;
      const size_t len = off < object.size() ? std::min(per, object.size() - off) : 0;
      if (len) std::memcpy(payload[i], object.data() + off, len);  // the rest stays zero
    }
  }
  coder.Encode(payload.data(), payload.data() + k, per);
  for (int i = 0; i < n; ++i) {
    FragmentHeader h{};
    h.magic = kFragmentMagic;
    h.format_version = kFragmentFormatVersion;
    h.header_bytes = sizeof(FragmentHeader);
    h.snapshot_version = snapshot_version;
    h.owner_node = owner_node;
    h.index = static_cast<uint16_t>(i);
    h.k = static_cast<uint8_t>(coder.k());
    h.m = static_cast<uint8_t>(coder.m());
    h.payload_bytes = per;
    h.object_bytes = object.size();
    h.payload_crc32 = Crc32(0, payload[i], per);
    h.header_crc32 = Crc32(0, &h, offsetof(FragmentHeader, header_crc32));
    std::memcpy(out[i].data(), &h, sizeof(h));
  }
  return out;
}

StatusOr<FragmentHeader> ParseFragment(std::span<const uint8_t> fragment) {
  FragmentHeader h;
  if (fragment.size() < sizeof(h)) {
    return DataLossError(StrCat("fragment: expected at least ", sizeof(h), " header bytes, found ",
                                fragment.size()));
  }
  std::memcpy(&h, fragment.data(), sizeof(h));
  if (h.magic != kFragmentMagic) {
    return DataLossError(StrCat("fragment: bad magic 0x", std::hex, h.magic, " (expected 0x",
                                kFragmentMagic, ")"));
  }
  uint32_t hcrc = Crc32(0, &h, offsetof(FragmentHeader, header_crc32));
  if (hcrc != h.header_crc32) {
    return DataLossError(StrCat("fragment: header CRC mismatch (stored ", h.header_crc32,
                                ", computed ", hcrc, ")"));
  }
  if (h.format_version != kFragmentFormatVersion || h.header_bytes != sizeof(h)) {
    return DataLossError(StrCat("fragment: expected format ", kFragmentFormatVersion, " with ",
                                sizeof(h), "-byte header, found format ", h.format_version,
                                " with ", h.header_bytes));
  }
  const std::string where = StrCat(" (node ", h.owner_node, " version ", h.snapshot_version,
                                   " fragment ", h.index, ")");
  if (h.k < 1 || h.m < 1 || h.k + h.m > kMaxErasureFragments || h.index >= h.k + h.m) {
    return DataLossError(StrCat("fragment: bad k=", int{h.k}, " m=", int{h.m}, where));
  }
  if (fragment.size() - sizeof(h) != h.payload_bytes ||
      h.object_bytes > h.payload_bytes * h.k) {
    return DataLossError(StrCat("fragment: expected ", h.payload_bytes, " payload bytes, found ",
                                fragment.size() - sizeof(h), where));
  }
  uint32_t pcrc = Crc32(0, fragment.data() + sizeof(h), h.payload_bytes);
  if (pcrc != h.payload_crc32) {
    return DataLossError(StrCat("fragment: payload CRC mismatch (stored ", h.payload_crc32,
                                ", computed ", pcrc, ")", where));
  }
  return h;
}

StatusOr<std::vector<uint8_t>> DecodeFragments(
    std::span<const std::span<const uint8_t>> fragments) {
  std::vector<int> corrupt;
  std::vector<const uint8_t*> payload(kMaxErasureFragments, nullptr);
  std::optional<FragmentHeader> ref;
  for (size_t f = 0; f < fragments.size(); ++f) {
    StatusOr<FragmentHeader> h = ParseFragment(fragments[f]);
    if (!h.ok()) {
      corrupt.push_back(static_cast<int>(f));
      continue;
    }
    if (!ref) ref = *h;
    if (h->owner_node != ref->owner_node || h->snapshot_version != ref->snapshot_version ||
        h->k != ref->k || h->m != ref->m || h->payload_bytes != ref->payload_bytes ||
        h->object_bytes != ref->object_bytes) {
      return InvalidArgumentError(StrCat(
          "fragments disagree: fragment ", h->index, " is node ", h->owner_node, " version ",
          h->snapshot_version, " k=", int{h->k}, " m=", int{h->m}, ", expected node ",
          ref->owner_node, " version ", ref->snapshot_version, " k=", int{ref->k},
          " m=", int{ref->m}));
    }
    payload[h->index] = fragments[f].data() + sizeof(FragmentHeader);
  }
  if (!ref) {
    return DataLossError(StrCat("no valid fragment among ", fragments.size(),
                                " (corrupt inputs: ", IndexList(corrupt), ")"));
  }
  TANDEM_ASSIGN_OR_RETURN(ErasureCoder coder, ErasureCoder::Create(ref->k, ref->m));
  const int n = coder.n();
  const size_t per = ref->payload_bytes;
  // Present fragments are read in place; only the missing ones get (aligned) storage.
  std::vector<uint8_t*> ptrs(n);
  bool present[kMaxErasureFragments] = {};
  std::vector<int> valid;
  int num_missing = 0;
  for (int i = 0; i < n; ++i) num_missing += payload[i] == nullptr;
  AlignedBytes rebuilt = AllocateAligned(per * std::max(1, num_missing));
  for (int i = 0, next = 0; i < n; ++i) {
    if (payload[i]) {
      ptrs[i] = const_cast<uint8_t*>(payload[i]);  // only read: it is present
      present[i] = true;
      valid.push_back(i);
    } else {
      ptrs[i] = rebuilt.get() + per * next++;
    }
  }
  Status s = coder.Reconstruct(ptrs.data(), present, per);
  if (!s.ok()) {
    return DataLossError(StrCat("cannot rebuild node ", ref->owner_node, " version ",
                                ref->snapshot_version, ": need ", coder.k(), " of ", n,
                                " fragments, valid: ", IndexList(valid),
                                "; corrupt inputs: ", IndexList(corrupt)));
  }
  std::vector<uint8_t> object(ref->object_bytes);
  size_t done = 0;
  for (int i = 0; i < coder.k() && done < object.size(); ++i) {
    size_t len = std::min(per, object.size() - done);
    std::memcpy(object.data() + done, ptrs[i], len);
    done += len;
  }
  return object;
}

}  // namespace tandem::checkpoint
