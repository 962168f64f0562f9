// Reed-Solomon / XOR erasure coding: every subset of up to m erasures rebuilds the object bitwise,
// corrupted fragments are detected and treated as missing, too few fragments is a clear error.
#include "checkpoint/erasure.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstring>
#include <random>
#include <span>
#include <vector>

namespace tandem::checkpoint {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

// Every subset of {0..n-1} with at most `max_lost` members, as bit masks.
std::vector<uint32_t> ErasureMasks(int n, int max_lost) {
  std::vector<uint32_t> masks;
  for (uint32_t mask = 0; mask < (1u << n); ++mask) {
    if (__builtin_popcount(mask) <= max_lost) masks.push_back(mask);
  }
  return masks;
}

void CheckEveryErasure(int k, int m, size_t object_bytes, uint64_t seed) {
  SCOPED_TRACE(testing::Message() << "k=" << k << " m=" << m << " bytes=" << object_bytes);
  auto coder = ErasureCoder::Create(k, m);
  ASSERT_TRUE(coder.ok()) << coder.status().ToString();
  std::vector<uint8_t> object = RandomBytes(object_bytes, seed);
  auto frags = EncodeFragments(*coder, object, /*snapshot_version=*/7, /*owner_node=*/3);
  ASSERT_TRUE(frags.ok()) << frags.status().ToString();
  ASSERT_EQ(frags->size(), static_cast<size_t>(k + m));
  // Systematic: the data fragments hold the object's bytes in order.
  const size_t per = (*frags)[0].size() - sizeof(FragmentHeader);
  EXPECT_EQ(per % kFragmentAlignBytes, 0u);
  for (int i = 0; i < k; ++i) {
    size_t off = per * i, len = off < object_bytes ? std::min(per, object_bytes - off) : 0;
    if (len) {
      EXPECT_EQ(std::memcmp((*frags)[i].data() + sizeof(FragmentHeader), &object[off], len), 0);
    }
  }
  for (uint32_t mask : ErasureMasks(k + m, m)) {
    std::vector<std::span<const uint8_t>> kept;
    for (int i = k + m - 1; i >= 0; --i) {  // reversed: order of inputs must not matter
      if (!(mask & (1u << i))) kept.emplace_back((*frags)[i]);
    }
    auto back = DecodeFragments(kept);
    ASSERT_TRUE(back.ok()) << "lost mask " << mask << ": " << back.status().ToString();
    ASSERT_EQ(*back, object) << "lost mask " << mask;
  }
  // One more loss than m cannot be rebuilt, and says so.
  std::vector<std::span<const uint8_t>> too_few;
  for (int i = m + 1; i < k + m; ++i) too_few.emplace_back((*frags)[i]);
  auto fail = DecodeFragments(too_few);
  ASSERT_FALSE(fail.ok());
  EXPECT_EQ(fail.status().code(), StatusCode::kDataLoss);
  if (k > 1) {  // with k == 1 nothing is left at all
    EXPECT_NE(fail.status().message().find("need " + std::to_string(k)), std::string::npos)
        << fail.status().ToString();
  }
}

TEST(Erasure, ReedSolomonK4M2EveryErasureSubset) {
  CheckEveryErasure(4, 2, 4096, 1);
  CheckEveryErasure(4, 2, 1000003, 2);  // odd size: padding is trimmed
  CheckEveryErasure(4, 2, 1, 3);
}

TEST(Erasure, XorK3M1EveryErasureSubset) {
  CheckEveryErasure(3, 1, 3 * 64 * 5, 4);
  CheckEveryErasure(3, 1, 777, 5);
}

TEST(Erasure, OtherShapes) {
  CheckEveryErasure(2, 1, 12345, 6);
  CheckEveryErasure(5, 3, 54321, 7);
  CheckEveryErasure(1, 2, 999, 8);
}

// The groups agents use with m = 2 and 3: every pair (triple) of lost fragments rebuilds bitwise.
TEST(Erasure, EveryKFrom2To5WithM2And3) {
  for (int k = 2; k <= 5; ++k) {
    for (int m = 2; m <= 3; ++m) CheckEveryErasure(k, m, 1000 * k + 37 * m, 100 + 10 * k + m);
  }
}

TEST(Erasure, XorParityIsTheXorOfData) {
  auto coder = ErasureCoder::Create(3, 1);
  ASSERT_TRUE(coder.ok());
  auto frags = EncodeFragments(*coder, RandomBytes(3 * 128, 9), 1, 0);
  ASSERT_TRUE(frags.ok());
  const size_t h = sizeof(FragmentHeader), per = (*frags)[0].size() - h;
  for (size_t i = 0; i < per; ++i) {
    uint8_t x = (*frags)[0][h + i] ^ (*frags)[1][h + i] ^ (*frags)[2][h + i];
    ASSERT_EQ((*frags)[3][h + i], x) << "byte " << i;
  }
}

TEST(Erasure, CrcMatchesZlib) {
  std::vector<uint8_t> data = RandomBytes(100001, 10);
  EXPECT_EQ(Crc32(0, data.data(), data.size()), crc32(0, data.data(), data.size()));
}

TEST(Erasure, CorruptFragmentsAreDetectedAndTreatedAsMissing) {
  auto coder = ErasureCoder::Create(4, 2);
  ASSERT_TRUE(coder.ok());
  std::vector<uint8_t> object = RandomBytes(50000, 11);
  auto frags = EncodeFragments(*coder, object, 5, 1);
  ASSERT_TRUE(frags.ok());
  std::mt19937_64 gen(12);
  // Flip one random payload bit of a data fragment and one header bit of a parity fragment.
  std::vector<std::vector<uint8_t>> bad = *frags;
  size_t pos = sizeof(FragmentHeader) + gen() % (bad[1].size() - sizeof(FragmentHeader));
  bad[1][pos] ^= 1u << (gen() % 8);
  bad[5][8] ^= 0x10;  // snapshot_version
  auto h1 = ParseFragment(bad[1]);
  ASSERT_FALSE(h1.ok());
  EXPECT_EQ(h1.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(h1.status().message().find("payload CRC"), std::string::npos) << h1.status().ToString();
  auto h5 = ParseFragment(bad[5]);
  ASSERT_FALSE(h5.ok());
  EXPECT_NE(h5.status().message().find("header CRC"), std::string::npos) << h5.status().ToString();
  auto truncated = ParseFragment(std::span<const uint8_t>(bad[0]).first(bad[0].size() - 1));
  EXPECT_FALSE(truncated.ok());

  // Two corrupt fragments = two erasures: still rebuilt bitwise.
  std::vector<std::span<const uint8_t>> all(bad.begin(), bad.end());
  auto back = DecodeFragments(all);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(*back, object);
  // A third loss is too many; the error names the corrupt inputs.
  all.erase(all.begin());
  auto fail = DecodeFragments(all);
  ASSERT_FALSE(fail.ok());
  EXPECT_EQ(fail.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(fail.status().message().find("corrupt inputs: 0,4"), std::string::npos)
      << fail.status().ToString();
}

TEST(Erasure, MixedVersionsAreRefused) {
  auto coder = ErasureCoder::Create(2, 1);
  ASSERT_TRUE(coder.ok());
  std::vector<uint8_t> object = RandomBytes(1000, 13);
  auto v1 = EncodeFragments(*coder, object, 1, 0);
  auto v2 = EncodeFragments(*coder, object, 2, 0);
  ASSERT_TRUE(v1.ok() && v2.ok());
  std::vector<std::span<const uint8_t>> mixed = {(*v1)[0], (*v2)[1]};
  auto r = DecodeFragments(mixed);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(Erasure, BadParametersAreRejected) {
  EXPECT_FALSE(ErasureCoder::Create(0, 1).ok());
  EXPECT_FALSE(ErasureCoder::Create(4, 0).ok());
  EXPECT_FALSE(ErasureCoder::Create(30, 3).ok());
  EXPECT_TRUE(ErasureCoder::Create(30, 2).ok());
}

}  // namespace
}  // namespace tandem::checkpoint
