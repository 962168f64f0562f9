// Deterministic hashing and random streams of the data pipeline (validation split, window order).
//
// Everything here is a pure function of its arguments, so the split and the order of windows are
// the same on every machine, compiler and rank. The rules are documented in docs/formats.md:
// - Mix64: SplitMix64's finalizer (Steele, Lea, Flood 2014).
// - DocHash(seed, i) = Mix64(Mix64(seed) ^ Mix64(i + 0x9E3779B97F4A7C15)); a document goes to the
//   validation split when (DocHash >> 11) * 2^-53 < val_fraction.
// - SplitMixStream: state += 0x9E3779B97F4A7C15; out = Mix64(state).
// - UniformBelow(n): Lemire's multiply-shift with rejection (unbiased).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace tandem::trainer::internal {

inline constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;

inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline uint64_t DocHash(uint64_t seed, uint64_t doc_index) {
  return Mix64(Mix64(seed) ^ Mix64(doc_index + kGoldenGamma));
}

// Uniform double in [0, 1) from the top 53 bits of a hash.
inline double HashToUnit(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

class SplitMixStream {
 public:
  explicit SplitMixStream(uint64_t state) : state_(state) {}
  uint64_t Next() {
    state_ += kGoldenGamma;
    return Mix64(state_);
  }
  // Uniform integer in [0, n), n >= 1.
  uint64_t UniformBelow(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(Next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
      while (low < threshold) {
        m = static_cast<unsigned __int128>(Next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

// The order of windows in `epoch`: a Fisher–Yates shuffle of 0..n-1 driven by
// SplitMixStream(Mix64(Mix64(seed) ^ Mix64(epoch + 1))), swapping i with UniformBelow(i + 1) for
// i = n-1 down to 1. Without shuffling, the identity.
inline std::vector<int64_t> EpochPermutation(uint64_t seed, uint64_t epoch, int64_t n,
                                             bool shuffle) {
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  if (!shuffle) return perm;
  SplitMixStream rng(Mix64(Mix64(seed) ^ Mix64(epoch + 1)));
  for (int64_t i = n - 1; i >= 1; --i) {
    const int64_t j = static_cast<int64_t>(rng.UniformBelow(static_cast<uint64_t>(i) + 1));
    std::swap(perm[i], perm[j]);
  }
  return perm;
}

}  // namespace tandem::trainer::internal
