// FaultInjectingStorage: each fault gives its error (EIO -> DataLoss, full disk ->
// ResourceExhausted, with the bytes that fit stored), short reads and writes are retried to
// success by Storage::Transfer, and the faults are a deterministic function of the seed. Run over
// both PosixStorage and IoUringStorage.
#include <cstring>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "offload/storage.h"
#include "tests/common/testing.h"

namespace tandem::offload {
namespace {

using tandem::testing::TempDir;

std::vector<char> RandomBytes(size_t n, uint64_t seed) {
  std::vector<char> out(n);
  Rng rng(seed);
  for (char& c : out) c = static_cast<char>(rng.NextU32());
  return out;
}

class FaultTest : public ::testing::TestWithParam<bool> {  // true: io_uring inside
 protected:
  void SetUp() override {
    if (GetParam()) {
      IoUringStorageOptions o;
      o.slab_bytes = 8192;
      inner_ = std::move(IoUringStorage::Open(dir_.Join("f.bin"), o).value());
    } else {
      inner_ = std::move(PosixStorage::Open(dir_.Join("f.bin")).value());
    }
  }
  TempDir dir_;
  std::unique_ptr<Storage> inner_;
};

TEST_P(FaultTest, ShortReadsAndWritesAreRetriedToSuccess) {
  FaultOptions o;
  o.seed = 7;
  o.short_read_probability = 0.6;
  o.short_write_probability = 0.6;
  FaultInjectingStorage faulty(inner_.get(), o);
  std::vector<char> shadow(100000, 0);
  Rng rng(3);
  for (int i = 0; i < 40; ++i) {
    const size_t n = 2 + rng.UniformInt(9000);
    const size_t off = rng.UniformInt(static_cast<uint32_t>(shadow.size() - n));
    const std::vector<char> data = RandomBytes(n, 100 + i);
    ASSERT_TRUE(faulty.Write(off, data.data(), n).ok());
    std::memcpy(shadow.data() + off, data.data(), n);
  }
  ASSERT_TRUE(faulty.Write(shadow.size() - 1, &shadow.back(), 1).ok());
  std::vector<char> got(shadow.size());
  ASSERT_TRUE(faulty.Read(0, got.data(), got.size()).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), shadow.data(), shadow.size()));
  for (int i = 0; i < 40; ++i) {
    const size_t n = 2 + rng.UniformInt(9000);
    const size_t off = rng.UniformInt(static_cast<uint32_t>(shadow.size() - n));
    std::vector<char> part(n);
    ASSERT_TRUE(faulty.Read(off, part.data(), n).ok());
    ASSERT_EQ(0, std::memcmp(part.data(), shadow.data() + off, n)) << off << "+" << n;
  }
  const FaultStats s = faulty.stats();
  EXPECT_GT(s.short_reads, 10);  // the faults really happened
  EXPECT_GT(s.short_writes, 10);
  EXPECT_EQ(s.eio, 0);
}

TEST_P(FaultTest, ShortReadAtEndOfFileIsOutOfRange) {
  const std::vector<char> data = RandomBytes(5000, 1);
  ASSERT_TRUE(inner_->Write(0, data.data(), data.size()).ok());
  FaultOptions o;
  o.short_read_probability = 1.0;
  FaultInjectingStorage faulty(inner_.get(), o);
  const uint64_t size = *faulty.SizeBytes();
  std::vector<char> out(size + 100);
  const Status st = faulty.Read(0, out.data(), out.size());
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st.ToString();
  EXPECT_NE(st.message().find(faulty.path()), std::string::npos) << st.message();
}

TEST_P(FaultTest, EioIsDataLossAndNamesTheRequest) {
  FaultOptions o;
  o.eio_probability = 1.0;
  FaultInjectingStorage faulty(inner_.get(), o);
  std::vector<char> buf(4321, 1);
  Status st = faulty.Write(12345, buf.data(), buf.size());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.ToString();
  EXPECT_NE(st.message().find("write of 4321 bytes at offset 12345"), std::string::npos)
      << st.message();
  st = faulty.Read(0, buf.data(), 10);
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.ToString();
  EXPECT_NE(st.message().find("Input/output error"), std::string::npos) << st.message();
  EXPECT_EQ(faulty.stats().eio, 2);
}

TEST_P(FaultTest, FullDiskAfterNBytesIsResourceExhaustedAndKeepsWhatFit) {
  FaultOptions o;
  o.enospc_after_bytes = 10000;
  FaultInjectingStorage faulty(inner_.get(), o);
  const std::vector<char> a = RandomBytes(6000, 1), b = RandomBytes(6000, 2);
  ASSERT_TRUE(faulty.Write(0, a.data(), a.size()).ok());
  const Status st = faulty.Write(6000, b.data(), b.size());
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted) << st.ToString();
  EXPECT_NE(st.message().find("No space left on device"), std::string::npos) << st.message();
  std::vector<char> got(10000);
  ASSERT_TRUE(inner_->Read(0, got.data(), got.size()).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), a.data(), 6000));
  EXPECT_EQ(0, std::memcmp(got.data() + 6000, b.data(), 4000));  // the 4000 bytes that fit
  EXPECT_EQ(faulty.Write(20000, a.data(), 1).code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(faulty.stats().enospc, 2);
  // Reads still work on a full disk.
  EXPECT_TRUE(faulty.Read(0, got.data(), 100).ok());
}

INSTANTIATE_TEST_SUITE_P(Inner, FaultTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "IoUring" : "Posix"; });

TEST(FaultInjectingStorageTest, SameSeedSameFaultsDifferentSeedDifferentFaults) {
  auto run = [](uint64_t seed) {
    TempDir dir;
    auto inner = PosixStorage::Open(dir.Join("d.bin")).value();
    FaultOptions o;
    o.seed = seed;
    o.short_write_probability = 0.5;
    o.eio_probability = 0.2;
    FaultInjectingStorage faulty(inner.get(), o);
    std::vector<int> codes;
    const std::vector<char> data = RandomBytes(1000, 1);
    for (int i = 0; i < 50; ++i) {
      codes.push_back(static_cast<int>(faulty.Write(i * 1000, data.data(), 1000).code()));
    }
    return std::make_pair(codes, faulty.stats().short_writes);
  };
  EXPECT_EQ(run(11), run(11));
  EXPECT_NE(run(11), run(12));
}

}  // namespace
}  // namespace tandem::offload
