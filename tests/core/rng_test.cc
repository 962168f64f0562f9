#include "core/rng.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <vector>

namespace tandem {
namespace {

// Known answers from the Random123 distribution (tests/kat_vectors, "philox4x32 10" lines):
// counter words c0..c3, key words k0 k1, expected output words.
struct PhiloxKat {
  uint32_t ctr[4];
  uint32_t key[2];
  uint32_t out[4];
};
constexpr PhiloxKat kPhiloxKats[] = {
    {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
     {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
     {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

uint64_t Join(uint32_t lo, uint32_t hi) { return lo | (static_cast<uint64_t>(hi) << 32); }

TEST(RngTest, PhiloxKnownAnswers) {
  for (const PhiloxKat& k : kPhiloxKats) {
    const Philox4x32Result r =
        Philox4x32(Join(k.key[0], k.key[1]), Join(k.ctr[2], k.ctr[3]), Join(k.ctr[0], k.ctr[1]));
    for (int i = 0; i < 4; ++i)
      EXPECT_EQ(r[i], k.out[i]) << "kat key " << k.key[0] << " word " << i;
  }
}

TEST(RngTest, SplitMix64KnownAnswers) {
  // The reference generator seeded with 1234567 (state += 0x9E3779B97F4A7C15 per output).
  const uint64_t expected[] = {6457827717110365317ull, 3203168211198807973ull,
                               9817491932198370423ull, 4593380528125082431ull,
                               16408922859458223821ull};
  uint64_t state = 1234567;
  for (uint64_t e : expected) {
    EXPECT_EQ(SplitMix64(state), e);
    state += 0x9E3779B97F4A7C15ull;
  }
  EXPECT_EQ(SplitMix64(0), 0xE220A8397B1DCDAFull);
}

TEST(RngTest, Fnv1a64KnownAnswers) {
  EXPECT_EQ(Fnv1a64(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(Fnv1a64("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(Fnv1a64("foobar"), 0x85944171f73967e8ull);
}

TEST(RngTest, DeriveSeedFollowsTheDocumentedRule) {
  // Values from an independent Python implementation of the rule in core/rng.h.
  EXPECT_EQ(DeriveSeed(0, 0, ""), 0x7dc2c42b173ebf65ull);
  EXPECT_EQ(DeriveSeed(1234, 3, "dropout"), 0xd7ec8aad0d65d76cull);
  EXPECT_EQ(DeriveSeed(42, -1, "data_shuffle"), 0xa834e87d1e235703ull);
  static_assert(DeriveSeed(7, 1, "x") == DeriveSeed(7, 1, "x"), "usable at compile time");
}

TEST(RngTest, DistinctSeedsForDistinctRanksAndPurposes) {
  std::set<uint64_t> seeds;
  const char* purposes[] = {"dropout", "data_shuffle", "lora_init", "init", "dropou"};
  for (int64_t rank = 0; rank < 256; ++rank) {
    for (const char* p : purposes) seeds.insert(DeriveSeed(99, rank, p));
  }
  EXPECT_EQ(seeds.size(), 256u * 5u);
  EXPECT_NE(DeriveSeed(1, 0, "a"), DeriveSeed(2, 0, "a"));
}

TEST(RngTest, DeterministicAndResumableFromPosition) {
  Rng a(DeriveSeed(5, 0, "t"), 3);
  Rng b(DeriveSeed(5, 0, "t"), 3);
  std::vector<uint32_t> words;
  for (int i = 0; i < 103; ++i) {
    words.push_back(a.NextU32());
    EXPECT_EQ(words.back(), b.NextU32());
  }
  EXPECT_EQ(a.position(), 103u);
  // Words come from consecutive Philox blocks of (seed, stream).
  const Philox4x32Result block25 = Philox4x32(a.seed(), 3, 25);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(words[100 + i], block25[i]);
  // A generator rebuilt from any saved position continues the same sequence.
  for (uint64_t pos : {0u, 1u, 4u, 57u, 102u}) {
    Rng resumed(a.seed(), 3, pos);
    for (uint64_t i = pos; i < words.size(); ++i) ASSERT_EQ(resumed.NextU32(), words[i]) << pos;
  }
  Rng c(a.seed(), 3);
  const uint64_t u64 = c.NextU64();
  EXPECT_EQ(u64, Join(words[0], words[1]));
}

TEST(RngTest, StreamsAndSeedsDiffer) {
  const uint64_t seed = DeriveSeed(11, 0, "x");
  Rng s0(seed, 0), s1(seed, 1), other(DeriveSeed(11, 1, "x"), 0);
  int same01 = 0, same_seed = 0;
  for (int i = 0; i < 1000; ++i) {
    const uint32_t a = s0.NextU32(), b = s1.NextU32(), c = other.NextU32();
    same01 += a == b;
    same_seed += a == c;
  }
  EXPECT_LE(same01, 1);
  EXPECT_LE(same_seed, 1);
}

TEST(RngTest, UniformMeanVarianceAndRange) {
  Rng rng(DeriveSeed(2024, 0, "uniform"));
  constexpr int kN = 1 << 20;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < kN; ++i) {
    const float u = rng.Uniform();
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    ASSERT_EQ(u * 16777216.0f, std::floor(u * 16777216.0f)) << "not a multiple of 2^-24";
    sum += u;
    sum_sq += static_cast<double>(u) * u;
  }
  const double mean = sum / kN;
  const double var = sum_sq / kN - mean * mean;
  // Five standard errors: sd(mean) = sqrt(1/12/N) ~ 2.8e-4, sd(var) = sqrt(1/180/N) ~ 7.3e-5.
  EXPECT_NEAR(mean, 0.5, 1.5e-3);
  EXPECT_NEAR(var, 1.0 / 12.0, 4e-4);
}

TEST(RngTest, NormalMomentsAndFinite) {
  Rng rng(DeriveSeed(2024, 0, "normal"));
  constexpr int kN = 1 << 20;
  double sum = 0, sum_sq = 0, sum_4 = 0;
  for (int i = 0; i < kN; ++i) {
    const double z = rng.Normal();
    ASSERT_TRUE(std::isfinite(z));
    sum += z;
    sum_sq += z * z;
    sum_4 += z * z * z * z;
  }
  const double mean = sum / kN;
  // Five standard errors: sd(mean) ~ 1e-3, sd(E z^2) = sqrt(2/N) ~ 1.4e-3, sd(E z^4) ~ 0.01.
  EXPECT_NEAR(mean, 0.0, 5e-3);
  EXPECT_NEAR(sum_sq / kN, 1.0, 7e-3);
  EXPECT_NEAR(sum_4 / kN, 3.0, 0.05);
}

TEST(RngTest, UniformIntInRangeAndBalanced) {
  Rng rng(DeriveSeed(3, 0, "int"));
  constexpr int kBound = 6;
  constexpr int kN = 600000;
  int counts[kBound] = {};
  for (int i = 0; i < kN; ++i) {
    const uint32_t v = rng.UniformInt(kBound);
    ASSERT_LT(v, static_cast<uint32_t>(kBound));
    ++counts[v];
  }
  double chi2 = 0;
  for (int c : counts)
    chi2 += (c - kN / kBound) * static_cast<double>(c - kN / kBound) / (kN / kBound);
  EXPECT_LT(chi2, 20.5);  // 5 degrees of freedom: p = 0.001
  EXPECT_EQ(rng.UniformInt(1), 0u);
  // A bound just above 2^31 rejects almost half of all words; results stay in range and cover the
  // upper half.
  const uint32_t big = (1u << 31) + 1;
  int upper = 0;
  for (int i = 0; i < 10000; ++i) {
    const uint32_t v = rng.UniformInt(big);
    ASSERT_LT(v, big);
    upper += v >= (1u << 30);
  }
  EXPECT_NEAR(upper, 5000, 250);
}

TEST(RngTest, EveryBitBalanced) {
  Rng rng(DeriveSeed(8, 2, "bits"));
  constexpr int kN = 100000;
  int ones[64] = {};
  for (int i = 0; i < kN; ++i) {
    const uint64_t v = rng.NextU64();
    for (int b = 0; b < 64; ++b) ones[b] += (v >> b) & 1;
  }
  // sd = sqrt(N/4) ~ 158; allow 5 sd.
  for (int b = 0; b < 64; ++b) EXPECT_NEAR(ones[b], kN / 2, 800) << "bit " << b;
}

}  // namespace
}  // namespace tandem
