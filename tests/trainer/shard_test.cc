// Token shards: round trips at both token widths, write-time validation, and every corruption
// OpenShard must refuse with a clear error.
#include "trainer/shard.h"

#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "tests/common/testing.h"

namespace tandem::trainer {
namespace {

using ::tandem::testing::TempDir;

std::string ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void Put(std::string& bytes, size_t offset, T v) {
  std::memcpy(bytes.data() + offset, &v, sizeof(T));
}
template <typename T>
T Get(const std::string& bytes, size_t offset) {
  T v;
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  return v;
}

// Recomputes both CRCs, so a test can corrupt one field and see the check made for that field.
void FixCrcs(std::string& b) {
  const auto* p = reinterpret_cast<const Bytef*>(b.data());
  Put<uint32_t>(b, 44, static_cast<uint32_t>(crc32(0, p + 64, static_cast<uInt>(b.size() - 64))));
  Put<uint32_t>(b, 48, static_cast<uint32_t>(crc32(0, p, 48)));
}

struct Data {
  std::vector<int32_t> tokens;
  std::vector<int64_t> starts;
  std::vector<uint8_t> mask;
};

// n random tokens below vocab in random non-empty documents, with a random 0/1 mask.
Data RandomData(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Data d;
  for (int64_t i = 0; i < n; ++i) {
    d.tokens.push_back(static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab)));
    d.mask.push_back(static_cast<uint8_t>(rng() % 2));
    if (i == 0 || rng() % 7 == 0) d.starts.push_back(i);
  }
  return d;
}

void ExpectSame(const Shard& s, const Data& d, int64_t vocab, bool with_mask) {
  ASSERT_EQ(s.num_tokens(), static_cast<int64_t>(d.tokens.size()));
  ASSERT_EQ(s.num_docs(), static_cast<int64_t>(d.starts.size()));
  EXPECT_EQ(s.vocab_size(), vocab);
  EXPECT_EQ(s.token_width(), vocab <= 65536 ? 2u : 4u);
  EXPECT_EQ(s.has_loss_mask(), with_mask);
  for (size_t i = 0; i < d.tokens.size(); ++i) ASSERT_EQ(s.token(i), d.tokens[i]) << "token " << i;
  std::vector<int32_t> copy(d.tokens.size());
  s.CopyTokens(copy.data(), 0, static_cast<int64_t>(copy.size()));
  EXPECT_EQ(copy, d.tokens);
  ASSERT_EQ(s.doc_index().size(), d.starts.size() + 1);
  for (size_t i = 0; i < d.starts.size(); ++i) {
    EXPECT_EQ(s.doc_index()[i], static_cast<uint64_t>(d.starts[i]));
  }
  EXPECT_EQ(s.doc_index().back(), d.tokens.size());
  if (with_mask) {
    ASSERT_EQ(s.loss_mask().size(), d.mask.size());
    for (size_t i = 0; i < d.mask.size(); ++i) ASSERT_EQ(s.loss_mask()[i], d.mask[i]);
  } else {
    EXPECT_TRUE(s.loss_mask().empty());
  }
}

TEST(ShardTest, RoundTripBothWidthsWithAndWithoutMask) {
  TempDir dir;
  uint64_t seed = 11;
  for (int64_t vocab : {259, 65536, 65537, 128256}) {
    for (bool with_mask : {false, true}) {
      const Data d = RandomData(1001, vocab, seed++);
      const std::string path = dir.Join("s.tshard");
      const std::span<const uint8_t> mask =
          with_mask ? std::span<const uint8_t>(d.mask) : std::span<const uint8_t>();
      ASSERT_TRUE(WriteShard(path, d.tokens, d.starts, mask, vocab).ok());
      EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
      StatusOr<Shard> s = OpenShard(path);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      ExpectSame(*s, d, vocab, with_mask);
      // Size: header + tokens padded to 8 + index + mask.
      const size_t w = vocab <= 65536 ? 2 : 4;
      const size_t expect = 64 + (d.tokens.size() * w + 7) / 8 * 8 + (d.starts.size() + 1) * 8 +
                            (with_mask ? d.tokens.size() : 0);
      EXPECT_EQ(std::filesystem::file_size(path), expect);
    }
  }
}

TEST(ShardTest, LargestIdsAndFlagsSurvive) {
  TempDir dir;
  const std::vector<int32_t> tokens = {65535, 0, 65534};
  const std::vector<int64_t> starts = {0, 2};
  ShardWriteOptions opt;
  opt.first_doc_continues = true;
  ASSERT_TRUE(WriteShard(dir.Join("a"), tokens, starts, {}, 65536, opt).ok());
  StatusOr<Shard> s = OpenShard(dir.Join("a"));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_TRUE(s->first_doc_continues());
  EXPECT_EQ(s->token(0), 65535);
  EXPECT_EQ(s->token(2), 65534);
  // Moving keeps the mapping alive.
  Shard moved = std::move(*s);
  EXPECT_EQ(moved.token(0), 65535);
}

TEST(ShardTest, EmptyShard) {
  TempDir dir;
  ASSERT_TRUE(WriteShard(dir.Join("e"), {}, {}, {}, 259).ok());
  StatusOr<Shard> s = OpenShard(dir.Join("e"));
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->num_tokens(), 0);
  EXPECT_EQ(s->num_docs(), 0);
}

TEST(ShardTest, WriteRejectsBadInput) {
  TempDir dir;
  const std::string path = dir.Join("bad");
  const std::vector<int32_t> tokens = {1, 2, 3, 4};
  const std::vector<int64_t> starts = {0, 2};
  const std::vector<uint8_t> mask = {1, 0, 1, 1};
  struct Case {
    const char* what;
    std::vector<int32_t> tokens;
    std::vector<int64_t> starts;
    std::vector<uint8_t> mask;
    int64_t vocab;
    const char* expect;
  } cases[] = {
      {"token >= vocab", {1, 2, 300, 4}, starts, mask, 259, "outside the vocabulary"},
      {"negative token", {1, -2, 3, 4}, starts, mask, 259, "outside the vocabulary"},
      {"first start not 0", tokens, {1, 2}, mask, 259, "starts must begin at 0"},
      {"repeated start", tokens, {0, 2, 2}, mask, 259, "strictly increase"},
      {"start past end", tokens, {0, 4}, mask, 259, "strictly increase"},
      {"no documents", tokens, {}, mask, 259, "doc_starts is empty"},
      {"short mask", tokens, starts, {1, 1}, 259, "one per token"},
      {"mask value 2", tokens, starts, {1, 2, 1, 1}, 259, "expected 0 or 1"},
      {"zero vocab", tokens, starts, mask, 0, "vocab_size"},
  };
  for (const Case& c : cases) {
    Status s = WriteShard(path, c.tokens, c.starts, c.mask, c.vocab);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(s.message().find(c.expect), std::string::npos) << c.what << ": " << s.message();
    EXPECT_NE(s.message().find(path), std::string::npos) << c.what << ": " << s.message();
    EXPECT_FALSE(std::filesystem::exists(path)) << c.what;
    EXPECT_FALSE(std::filesystem::exists(path + ".tmp")) << c.what;
  }
}

TEST(ShardTest, WriteFailsOnMissingDirectory) {
  TempDir dir;
  Status s = WriteShard(dir.Join("no/such/dir/x.tshard"), std::vector<int32_t>{1},
                        std::vector<int64_t>{0}, {}, 259);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("no/such/dir/x.tshard.tmp"), std::string::npos) << s.message();
}

class ShardCorruptionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    d_ = RandomData(301, 1000, 7);  // odd count: the u16 tokens need padding
    path_ = dir_.Join("c.tshard");
    ASSERT_TRUE(WriteShard(path_, d_.tokens, d_.starts, d_.mask, 1000).ok());
    bytes_ = ReadBytes(path_);
    index_offset_ = 64 + (d_.tokens.size() * 2 + 7) / 8 * 8;
    mask_offset_ = index_offset_ + (d_.starts.size() + 1) * 8;
  }
  // Writes `bytes` and expects OpenShard to fail with `code` and a message naming the file and
  // containing `what`.
  void ExpectError(const std::string& bytes, StatusCode code, const std::string& what) {
    WriteBytes(path_, bytes);
    StatusOr<Shard> s = OpenShard(path_);
    ASSERT_FALSE(s.ok()) << "corruption not detected: " << what;
    EXPECT_EQ(s.status().code(), code) << s.status().ToString();
    EXPECT_NE(s.status().message().find(what), std::string::npos) << s.status().ToString();
    EXPECT_NE(s.status().message().find(path_), std::string::npos) << s.status().ToString();
  }

  TempDir dir_;
  Data d_;
  std::string path_;
  std::string bytes_;
  size_t index_offset_ = 0;
  size_t mask_offset_ = 0;
};

TEST_F(ShardCorruptionTest, IntactFileOpens) {
  StatusOr<Shard> s = OpenShard(path_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ExpectSame(*s, d_, 1000, true);
}

TEST_F(ShardCorruptionTest, MissingFile) {
  StatusOr<Shard> s = OpenShard(dir_.Join("nope.tshard"));
  EXPECT_EQ(s.status().code(), StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("nope.tshard"), std::string::npos);
}

TEST_F(ShardCorruptionTest, TruncatedHeader) {
  ExpectError(bytes_.substr(0, 10), StatusCode::kDataLoss, "truncated");
  ExpectError("", StatusCode::kDataLoss, "truncated");
}

TEST_F(ShardCorruptionTest, TruncatedPayload) {
  ExpectError(bytes_.substr(0, bytes_.size() - 1), StatusCode::kDataLoss, "truncated");
  ExpectError(bytes_.substr(0, 100), StatusCode::kDataLoss, "truncated");
}

TEST_F(ShardCorruptionTest, TrailingBytes) {
  ExpectError(bytes_ + "x", StatusCode::kDataLoss, "trailing bytes");
}

TEST_F(ShardCorruptionTest, BadMagic) {
  std::string b = bytes_;
  b[3] = 'X';
  ExpectError(b, StatusCode::kDataLoss, "bad magic");
}

TEST_F(ShardCorruptionTest, NewerVersion) {
  std::string b = bytes_;
  Put<uint32_t>(b, 8, 2);
  FixCrcs(b);
  ExpectError(b, StatusCode::kUnimplemented, "format version 2");
}

TEST_F(ShardCorruptionTest, HeaderBitFlip) {
  std::string b = bytes_;
  b[17] ^= 0x01;  // vocab size
  ExpectError(b, StatusCode::kDataLoss, "header CRC mismatch");
}

TEST_F(ShardCorruptionTest, PayloadBitFlips) {
  for (size_t offset : {size_t{64}, index_offset_ - 1, index_offset_ + 3, mask_offset_ + 5}) {
    std::string b = bytes_;
    b[offset] ^= 0x10;
    ExpectError(b, StatusCode::kDataLoss, "payload CRC mismatch");
  }
}

TEST_F(ShardCorruptionTest, WidthDoesNotFitVocab) {
  std::string b = bytes_;
  Put<uint32_t>(b, 12, 4);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "token width 4 does not fit vocab size 1000");
}

TEST_F(ShardCorruptionTest, UnknownFlags) {
  std::string b = bytes_;
  Put<uint32_t>(b, 40, 0x5);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "unknown flags");
}

TEST_F(ShardCorruptionTest, ImpossibleCounts) {
  std::string b = bytes_;
  Put<uint64_t>(b, 24, uint64_t{1} << 62);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "impossible sizes");
}

TEST_F(ShardCorruptionTest, DocumentIndexNotIncreasing) {
  ASSERT_GE(d_.starts.size(), 3u);
  std::string b = bytes_;
  Put<uint64_t>(b, index_offset_ + 2 * 8, d_.starts[1]);  // document 1 becomes empty
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "not strictly increasing");
}

TEST_F(ShardCorruptionTest, DocumentIndexOutOfRange) {
  std::string b = bytes_;
  const size_t end_offset = index_offset_ + d_.starts.size() * 8;
  Put<uint64_t>(b, end_offset, d_.tokens.size() + 5);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "document index must run from 0 to 301");
  b = bytes_;
  Put<uint64_t>(b, index_offset_, 1);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "document index must run from 0");
}

TEST_F(ShardCorruptionTest, TokenOutsideVocabulary) {
  std::string b = bytes_;
  Put<uint16_t>(b, 64 + 2 * 17, 1000);
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "token 17 is 1000, >= vocab size 1000");
}

TEST_F(ShardCorruptionTest, MaskByteNotBinary) {
  std::string b = bytes_;
  b[mask_offset_ + 9] = 7;
  FixCrcs(b);
  ExpectError(b, StatusCode::kDataLoss, "loss mask byte 9 is 7");
}

}  // namespace
}  // namespace tandem::trainer
