#include "model/internal/tokenizer_unicode.h"

#include <array>

namespace tandem::model::internal {
namespace {

// Bytes that GPT-2's alphabet keeps as themselves: the printable, non-space Latin-1 characters.
constexpr bool KeepsItself(uint32_t b) {
  return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// The other 68 bytes (controls, space, DEL, C1 controls, NBSP, soft hyphen) take U+0100.. in order.
constexpr int kNumShifted = 68;

struct ByteTables {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 256 + kNumShifted> to_byte{};
};

constexpr ByteTables MakeByteTables() {
  ByteTables t;
  for (auto& v : t.to_byte) v = -1;
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    t.to_cp[b] = KeepsItself(b) ? b : next++;
    t.to_byte[t.to_cp[b]] = static_cast<int16_t>(b);
  }
  return t;
}

constexpr ByteTables kByteTables = MakeByteTables();
static_assert(kByteTables.to_cp[' '] == 0x120, "space must map to U+0120 (Ġ)");
static_assert(kByteTables.to_cp['\n'] == 0x10A, "newline must map to U+010A (Ċ)");

// Class of ASCII code points, for the common case without a table search.
constexpr std::array<CharClass, 128> MakeAsciiClasses() {
  std::array<CharClass, 128> t{};
  for (uint32_t c = 0; c < 128; ++c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
      t[c] = CharClass::kLetter;
    } else if (c >= '0' && c <= '9') {
      t[c] = CharClass::kNumber;
    } else if (c == ' ' || (c >= 0x09 && c <= 0x0D)) {
      t[c] = CharClass::kSpace;
    } else {
      t[c] = CharClass::kOther;
    }
  }
  return t;
}
constexpr std::array<CharClass, 128> kAsciiClasses = MakeAsciiClasses();

bool IsContinuation(uint8_t b) { return (b & 0xC0) == 0x80; }

}  // namespace

CharClass ClassifyCodePoint(uint32_t cp) {
  if (cp < 128) return kAsciiClasses[cp];
  if (cp == kInvalidCodePoint) return CharClass::kOther;
  // Last range whose first <= cp.
  size_t lo = 0, hi = kNumUnicodeClassRanges;
  while (hi - lo > 1) {
    size_t mid = (lo + hi) / 2;
    if (kUnicodeClassRanges[mid].first <= cp) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return kUnicodeClassRanges[lo].cls;
}

DecodedChar DecodeUtf8(std::string_view text, size_t pos) {
  if (pos >= text.size()) return {0, 0, CharClass::kOther};
  const auto* s = reinterpret_cast<const uint8_t*>(text.data()) + pos;
  const size_t avail = text.size() - pos;
  const uint8_t b0 = s[0];
  if (b0 < 0x80) return {b0, 1, kAsciiClasses[b0]};
  const DecodedChar invalid{kInvalidCodePoint, 1, CharClass::kOther};
  uint32_t len, cp, min_cp;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2, cp = b0 & 0x1F, min_cp = 0x80;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3, cp = b0 & 0x0F, min_cp = 0x800;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4, cp = b0 & 0x07, min_cp = 0x10000;
  } else {
    return invalid;  // a continuation byte, an overlong lead (C0, C1) or F5..FF
  }
  if (avail < len) return invalid;
  for (uint32_t i = 1; i < len; ++i) {
    if (!IsContinuation(s[i])) return invalid;
    cp = (cp << 6) | (s[i] & 0x3F);
  }
  if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return invalid;
  return {cp, len, ClassifyCodePoint(cp)};
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

uint32_t ByteToCodePoint(uint8_t byte) { return kByteTables.to_cp[byte]; }

int CodePointToByte(uint32_t cp) {
  return cp < kByteTables.to_byte.size() ? kByteTables.to_byte[cp] : -1;
}

void AppendByteLevel(std::string_view bytes, std::string* out) {
  for (char c : bytes) AppendUtf8(kByteTables.to_cp[static_cast<uint8_t>(c)], out);
}

}  // namespace tandem::model::internal
