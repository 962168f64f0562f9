// Counter-based deterministic random numbers, identical on host and CUDA device.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
// 64-bit key and a 128-bit counter to four 32-bit words. There is no hidden state: the same
// (key, counter) gives the same words on every thread, device and run, so a kernel thread can
// draw its numbers from (seed, element index) with no coordination, and a resumed run restarts a
// stream exactly from a saved position.
//
// Word order (matching the Random123 reference and its known-answer tests): the key words are
// k0 = low 32 bits of `key`, k1 = high 32 bits; the counter words are c0 = low 32 bits of
// `counter_lo`, c1 = its high 32 bits, c2 = low 32 bits of `counter_hi`, c3 = its high 32 bits.
//
// Seeds. A run has one seed in its config; every stream of random numbers uses
//   DeriveSeed(base_seed, rank, purpose)
// which is defined as
//   h = SplitMix64(base_seed)
//   h = SplitMix64(h ^ uint64_t(rank))
//   h = SplitMix64(h ^ Fnv1a64(purpose))
//   return h
// where SplitMix64(x) is the first output of Steele, Lea and Flood's SplitMix64 generator seeded
// with x: z = x + 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
// z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31) (all arithmetic mod 2^64), and
// Fnv1a64 is 64-bit FNV-1a over the bytes of `purpose` (offset basis 0xCBF29CE484222325, prime
// 0x100000001B3; for each byte: h ^= byte; h *= prime). `rank` is the process's global rank (use 0
// for streams that must agree across ranks, such as weight init of replicated parameters);
// `purpose` names the stream ("dropout", "data_shuffle", "lora_init").
//
// Thread-safety: functions are pure; an Rng is a small value owned by one thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define TANDEM_HOST_DEVICE __host__ __device__
#else
#define TANDEM_HOST_DEVICE
#endif

namespace tandem {

struct Philox4x32Result {
  uint32_t v[4];
  TANDEM_HOST_DEVICE uint32_t operator[](int i) const { return v[i]; }
  TANDEM_HOST_DEVICE static constexpr int size() { return 4; }
};

namespace rng_internal {

TANDEM_HOST_DEVICE inline uint32_t MulHi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

}  // namespace rng_internal

// Philox4x32 with 10 rounds. See the header comment for the word order.
TANDEM_HOST_DEVICE inline Philox4x32Result Philox4x32(uint64_t key, uint64_t counter_hi,
                                                      uint64_t counter_lo) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter_lo);
  uint32_t c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi);
  uint32_t c3 = static_cast<uint32_t>(counter_hi >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {  // the key schedule advances before every round but the first
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const uint32_t hi0 = rng_internal::MulHi32(kMul0, c0);
    const uint32_t lo0 = kMul0 * c0;
    const uint32_t hi1 = rng_internal::MulHi32(kMul1, c2);
    const uint32_t lo1 = kMul1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32Result{{c0, c1, c2, c3}};
}

TANDEM_HOST_DEVICE constexpr uint64_t SplitMix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t Fnv1a64(std::string_view bytes) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (char c : bytes) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ull;
  }
  return h;
}

// The seed of one stream of one rank; the rule is in the header comment.
constexpr uint64_t DeriveSeed(uint64_t base_seed, int64_t rank, std::string_view purpose) {
  uint64_t h = SplitMix64(base_seed);
  h = SplitMix64(h ^ static_cast<uint64_t>(rank));
  return SplitMix64(h ^ Fnv1a64(purpose));
}

// A sequential stream over Philox: block b of stream `stream` under key `seed` is
// Philox4x32(seed, stream, b), and its four words are consumed in order. The position (words
// consumed so far) fully describes the state: Rng(seed, stream, position) continues exactly where
// a generator that had drawn `position` words left off, which is how RNG state is checkpointed.
// NextU64 takes two words (low word first); Uniform one; Normal two; UniformInt one or more.
class Rng {
 public:
  TANDEM_HOST_DEVICE explicit Rng(uint64_t seed, uint64_t stream = 0, uint64_t position = 0)
      : seed_(seed), stream_(stream), position_(position) {
    if (position_ % 4 != 0) Refill();
  }

  TANDEM_HOST_DEVICE uint64_t seed() const { return seed_; }
  TANDEM_HOST_DEVICE uint64_t stream() const { return stream_; }
  // 32-bit words consumed so far.
  TANDEM_HOST_DEVICE uint64_t position() const { return position_; }

  TANDEM_HOST_DEVICE uint32_t NextU32() {
    if (position_ % 4 == 0) Refill();
    return block_.v[position_++ % 4];
  }

  TANDEM_HOST_DEVICE uint64_t NextU64() {
    const uint64_t lo = NextU32();
    return lo | (static_cast<uint64_t>(NextU32()) << 32);
  }

  // Uniform in [0, 1): a multiple of 2^-24, so every value is exact in float.
  TANDEM_HOST_DEVICE float Uniform() {
    return static_cast<float>(NextU32() >> 8) * (1.0f / 16777216.0f);
  }

  // Standard normal by Box-Muller (the cosine branch; uses two words per value).
  TANDEM_HOST_DEVICE float Normal() {
    // u1 in (0, 1] so the logarithm is finite.
    const float u1 = static_cast<float>((NextU32() >> 8) + 1) * (1.0f / 16777216.0f);
    const float u2 = Uniform();
    const float radius = sqrtf(-2.0f * logf(u1));
    return radius * cosf(6.2831853071795865f * u2);
  }

  // Uniform in [0, bound), exactly (rejection of the biased low range). Precondition: bound > 0.
  TANDEM_HOST_DEVICE uint32_t UniformInt(uint32_t bound) {
    const uint32_t threshold = (0u - bound) % bound;  // 2^32 mod bound
    while (true) {
      const uint32_t r = NextU32();
      if (r >= threshold) return r % bound;
    }
  }

 private:
  TANDEM_HOST_DEVICE void Refill() { block_ = Philox4x32(seed_, stream_, position_ / 4); }

  uint64_t seed_;
  uint64_t stream_;
  uint64_t position_;
  Philox4x32Result block_{};
};

}  // namespace tandem
