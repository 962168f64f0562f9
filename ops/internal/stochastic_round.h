// Stochastic rounding of f32 to bf16, and the noise it draws, identical on the host and on a CUDA
// device (the CPU reference and the kernels of ops::AdamWBf16Multi give the same bits).
//
// Rounding. A finite f32 with bits u becomes the bf16 whose bits are (u + r) >> 16 for a noise
// word r uniform in [0, 2^16): the magnitude rounds away from zero with probability (u mod 2^16)
// / 2^16, so the rounded value's expectation is the f32 value (unbiased, which round-to-nearest is
// not: an update smaller than half a bf16 step is lost every time). Infinities stay; NaN stays a
// quiet NaN. The largest finite magnitudes may round to infinity.
//
// Noise. An update's noise comes from a 64-bit key (NoiseKey: the run's seed, the step, the
// tensor) and the element index; element i of a tensor draws
//   h1 = Mix32(key_lo ^ Mix32(uint32(i) + key_hi)),  h2 = Mix32(h1 + 0x9E3779B9)
// and uses h1's low half, h1's high half and h2's low half for its three rounded values, where
// Mix32 is a 32-bit integer finaliser (two multiply-xorshift rounds). Not cryptographic; an
// element's three words and neighbouring elements' words are uncorrelated for this purpose.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/rng.h"  // SplitMix64, TANDEM_HOST_DEVICE

namespace tandem::ops::internal {

TANDEM_HOST_DEVICE inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// The key of one tensor's update: distinct for every (seed, step, tensor).
TANDEM_HOST_DEVICE inline uint64_t NoiseKey(uint64_t seed, int64_t step, uint64_t tensor) {
  uint64_t h = SplitMix64(seed);
  h = SplitMix64(h ^ static_cast<uint64_t>(step));
  return SplitMix64(h ^ tensor);
}

// The two noise words of element i (see the header comment).
struct NoiseWords {
  uint32_t h1, h2;
};
TANDEM_HOST_DEVICE inline NoiseWords ElementNoise(uint64_t key, int64_t i) {
  const uint32_t lo = static_cast<uint32_t>(key), hi = static_cast<uint32_t>(key >> 32);
  const uint32_t h1 = Mix32(lo ^ Mix32(static_cast<uint32_t>(i) + hi));
  return {h1, Mix32(h1 + 0x9E3779B9u)};
}

TANDEM_HOST_DEVICE inline uint32_t F32Bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// The bf16 bits of f rounded with noise r (only its low 16 bits are used).
TANDEM_HOST_DEVICE inline uint16_t StochasticBf16Bits(float f, uint32_t r) {
  const uint32_t u = F32Bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u) {  // infinity stays, NaN stays a quiet NaN
    return static_cast<uint16_t>((u >> 16) | ((u & 0x007FFFFFu) != 0 ? 0x0040u : 0u));
  }
  return static_cast<uint16_t>((u + (r & 0xFFFFu)) >> 16);
}

}  // namespace tandem::ops::internal
