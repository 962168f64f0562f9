// CRC32C: SSE4.2 hardware path with a byte-table fallback.
#include "offload/internal/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace tandem::offload::internal {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

constexpr std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPolyReflected : c >> 1;
    table[i] = c;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = MakeTable();

#if defined(__x86_64__)
// The CRC register (no pre/post inversion) after feeding n bytes to register c.
__attribute__((target("sse4.2"))) uint64_t CrcRegister(uint64_t c, const unsigned char* p,
                                                       size_t n) {
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t word;
    std::memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
  }
  for (; n > 0; ++p, --n) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p);
  return c;
}

// The crc32 instruction has a latency of 3 cycles and a throughput of 1: three independent
// streams of kStream bytes run at once and are joined with the register shift below.
constexpr size_t kStream = 1360;  // a multiple of 8; 3 * kStream = 4080 fits a 4096-byte block

// Shift(r) is the register after feeding kStream zero bytes to register r. It is linear in r,
// so it is the XOR of per-byte tables.
struct ShiftTable {
  uint32_t t[4][256];
  uint32_t Shift(uint32_t r) const {
    return t[0][r & 0xffu] ^ t[1][(r >> 8) & 0xffu] ^ t[2][(r >> 16) & 0xffu] ^ t[3][r >> 24];
  }
};

const ShiftTable& StreamShift() {
  static const ShiftTable table = [] {  // immutable after this thread-safe initialisation
    ShiftTable st{};
    static const unsigned char zeros[kStream] = {};
    for (int k = 0; k < 4; ++k) {
      for (uint32_t v = 0; v < 256; ++v) {
        st.t[k][v] = static_cast<uint32_t>(CrcRegister(uint64_t{v} << (8 * k), zeros, kStream));
      }
    }
    return st;
  }();
  return table;
}

__attribute__((target("sse4.2"))) uint32_t Crc32cHardware(const void* data, size_t n,
                                                          uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  if (n >= 3 * kStream) {
    const ShiftTable& shift = StreamShift();
    for (; n >= 3 * kStream; p += 3 * kStream, n -= 3 * kStream) {
      uint64_t a = c, b = 0, d = 0;
      for (size_t i = 0; i < kStream; i += 8) {
        uint64_t wa, wb, wd;
        std::memcpy(&wa, p + i, 8);
        std::memcpy(&wb, p + kStream + i, 8);
        std::memcpy(&wd, p + 2 * kStream + i, 8);
        a = _mm_crc32_u64(a, wa);
        b = _mm_crc32_u64(b, wb);
        d = _mm_crc32_u64(d, wd);
      }
      // register(A ++ B ++ C) = shift(shift(reg A) ^ reg B) ^ reg C, B and C from zero.
      c = shift.Shift(shift.Shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^
          static_cast<uint32_t>(d);
    }
  }
  return ~static_cast<uint32_t>(CrcRegister(c, p, n));
}

bool HaveSse42() { return __builtin_cpu_supports("sse4.2"); }
#endif

}  // namespace

uint32_t Crc32cPortable(const void* data, size_t num_bytes, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = ~crc;
  for (size_t i = 0; i < num_bytes; ++i) c = kTable[(c ^ p[i]) & 0xffu] ^ (c >> 8);
  return ~c;
}

uint32_t Crc32c(const void* data, size_t num_bytes, uint32_t crc) {
#if defined(__x86_64__)
  static const bool have_sse42 = HaveSse42();  // a constant of the CPU, not mutable state
  if (have_sse42) return Crc32cHardware(data, num_bytes, crc);
#endif
  return Crc32cPortable(data, num_bytes, crc);
}

}  // namespace tandem::offload::internal
