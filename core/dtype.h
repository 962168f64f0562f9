// Element types and their host-side conversions.
//
// bf16 is the upper half of an IEEE f32; FloatToBf16 rounds to nearest, ties to even, and keeps
// NaN a (quiet) NaN. f16 is IEEE binary16 with round-to-nearest-even, subnormals and infinities.
// These are the conversions the CPU reference and the host<->device copies use; the CUDA kernels
// use the hardware intrinsics, which round the same way.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "core/status.h"

namespace tandem {

enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kI64, kU8 };

// Size of one element in bytes.
size_t DTypeSize(DType dtype);
// "f32", "bf16", "f16", "i32", "i64", "u8".
const char* DTypeName(DType dtype);
// Parses the names above; also accepts safetensors' "F32", "BF16", "F16", "I32", "I64", "U8".
StatusOr<DType> ParseDType(std::string_view name);
bool IsFloating(DType dtype);

// Storage type of one bf16 value on the host.
struct Bf16 {
  uint16_t bits = 0;
};
// Storage type of one IEEE half value on the host.
struct F16 {
  uint16_t bits = 0;
};

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline Bf16 FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return Bf16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // quiet NaN, sign kept
  }
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;  // round to nearest, ties to even; overflow rounds to inf correctly
  return Bf16{static_cast<uint16_t>(u >> 16)};
}
inline float Bf16ToFloat(Bf16 h) { return BitsToFloat(static_cast<uint32_t>(h.bits) << 16); }
// Rounds an f32 through bf16 and back: the value a bf16 tensor would hold.
inline float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

F16 FloatToF16(float f);
float F16ToFloat(F16 h);

// Maps C++ element types to DType (for Tensor::data<T>() checks).
template <typename T>
struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kF32; };
template <> struct DTypeOf<Bf16> { static constexpr DType value = DType::kBF16; };
template <> struct DTypeOf<F16> { static constexpr DType value = DType::kF16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::kI32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::kI64; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::kU8; };

}  // namespace tandem
