#include "core/dtype.h"

#include <cmath>

namespace tandem {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
    case DType::kU8: return "u8";
  }
  return "?";
}

StatusOr<DType> ParseDType(std::string_view name) {
  struct Entry {
    const char* a;
    const char* b;
    DType t;
  };
  static constexpr Entry kTable[] = {
      {"f32", "F32", DType::kF32}, {"bf16", "BF16", DType::kBF16}, {"f16", "F16", DType::kF16},
      {"i32", "I32", DType::kI32}, {"i64", "I64", DType::kI64},   {"u8", "U8", DType::kU8},
  };
  for (const Entry& e : kTable) {
    if (name == e.a || name == e.b) return e.t;
  }
  return InvalidArgumentError(StrCat("unknown dtype '", name,
                                     "' (expected one of f32, bf16, f16, i32, i64, u8)"));
}

bool IsFloating(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

F16 FloatToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t exp = (u >> 23) & 0xffu;
  uint32_t mant = u & 0x7fffffu;
  if (exp == 0xff) {  // inf or NaN
    return F16{static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u))};
  }
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return F16{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow to inf
  if (e <= 0) {
    // Subnormal half (or zero): shift the full mantissa (with implicit 1) into place.
    if (e < -10) return F16{sign};
    mant |= 0x800000u;
    const int shift = 14 - e;  // 24-bit mantissa down to a 10-bit subnormal field
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;
    return F16{static_cast<uint16_t>(sign | half)};
  }
  uint32_t half = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into exp: correct
  return F16{static_cast<uint16_t>(sign | half)};
}

float F16ToFloat(F16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  return BitsToFloat(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

}  // namespace tandem
