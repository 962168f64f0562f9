// Storage engine: CRC32C known answers, the staging pool, and round trips through PosixStorage
// and IoUringStorage (O_DIRECT and buffered) at odd offsets and sizes against a shadow copy of
// the file, batched and overlapping requests, checksum detection of on-disk corruption, and the
// errors for reads past the end, unaligned existing files and unknown tickets.
#include "offload/storage.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "offload/internal/crc32c.h"
#include "offload/staging_pool.h"
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

TEST(Crc32cTest, KnownAnswersAndBothPathsAgree) {
  const char* text = "123456789";
  EXPECT_EQ(internal::Crc32c(text, 9), 0xE3069283u);
  EXPECT_EQ(internal::Crc32cPortable(text, 9), 0xE3069283u);
  std::vector<char> zeros(32, 0);
  EXPECT_EQ(internal::Crc32c(zeros.data(), 32), 0x8A9136AAu);  // RFC 3720 B.4
  for (size_t n : {0, 1, 7, 8, 9, 63, 4079, 4080, 4096, 4099, 8165, 65536}) {
    const std::vector<char> b = RandomBytes(n, n + 1);
    EXPECT_EQ(internal::Crc32c(b.data(), n), internal::Crc32cPortable(b.data(), n)) << n;
    // Continuation: crc(a ++ b) from crc(a).
    const size_t half = n / 2;
    EXPECT_EQ(internal::Crc32c(b.data() + half, n - half, internal::Crc32c(b.data(), half)),
              internal::Crc32c(b.data(), n));
  }
}

TEST(StagingPoolTest, AcquireReleaseStatsAndBlocking) {
  EXPECT_FALSE(StagingPool::Create({.slab_bytes = 1000, .num_slabs = 2}).ok());
  EXPECT_FALSE(StagingPool::Create({.slab_bytes = 4096, .num_slabs = 0}).ok());
  auto pool = StagingPool::Create({.slab_bytes = 8192, .num_slabs = 2});
  ASSERT_TRUE(pool.ok()) << pool.status().ToString();
  StagingPool& p = **pool;
  StagingPool::Slab a = p.Acquire();
  StagingPool::Slab b = p.Acquire();
  EXPECT_NE(a.index, b.index);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data) % 4096, 0u);
  EXPECT_EQ(p.slab_data(a.index), a.data);
  EXPECT_FALSE(p.TryAcquire().has_value());
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    p.Release(a);
  });
  StagingPool::Slab c = p.Acquire();  // waits for the release
  releaser.join();
  EXPECT_EQ(c.index, a.index);
  const StagingPoolStats s = p.stats();
  EXPECT_EQ(s.num_acquires, 3);
  EXPECT_EQ(s.num_waits, 1);
  EXPECT_EQ(s.slabs_in_use, 2);
  EXPECT_EQ(s.peak_slabs_in_use, 2);
  p.Release(b);
  p.Release(c);
}

enum class Impl { kPosix, kUringDirect, kUringBuffered, kUringShm };

std::unique_ptr<Storage> OpenStorage(Impl impl, const std::string& path,
                                     IoUringStorageOptions o = {}) {
  if (impl == Impl::kPosix) return std::move(PosixStorage::Open(path).value());
  o.direct_io = impl != Impl::kUringBuffered;
  auto s = IoUringStorage::Open(path, o);
  TANDEM_CHECK_MSG(s.ok(), s.status().ToString());
  return std::move(s).value();
}

class StorageRoundTripTest : public ::testing::TestWithParam<Impl> {
 protected:
  std::string Path() {
    if (GetParam() == Impl::kUringShm) {
      shm_path_ = StrCat("/dev/shm/tandem-offload-test-", getpid());
      return shm_path_;
    }
    return dir_.Join("data.bin");
  }
  void TearDown() override {
    if (!shm_path_.empty()) std::filesystem::remove(shm_path_);
  }
  TempDir dir_;
  std::string shm_path_;
};

// Random writes at odd offsets and sizes (some crossing slab boundaries) against a shadow copy,
// then random reads checked byte by byte, then everything again after reopening.
TEST_P(StorageRoundTripTest, OddOffsetsAndSizesMatchShadow) {
  const std::string path = Path();
  IoUringStorageOptions o;
  o.slab_bytes = 16384;  // small slabs: requests span several segments
  o.queue_depth = 4;
  o.submit_batch = 3;
  auto storage = OpenStorage(GetParam(), path, o);
  const size_t kFile = 200000;
  std::vector<char> shadow(kFile, 0);
  Rng rng(42);
  for (int i = 0; i < 60; ++i) {
    const size_t n = 1 + rng.UniformInt(i % 3 == 0 ? 50000 : 5000);
    const size_t off = rng.UniformInt(static_cast<uint32_t>(kFile - n));
    const std::vector<char> data = RandomBytes(n, 1000 + i);
    ASSERT_TRUE(storage->Write(off, data.data(), n).ok()) << "write " << i;
    std::memcpy(shadow.data() + off, data.data(), n);
  }
  // The last byte written may be short of kFile: extend the shadow's notion to what was written.
  ASSERT_TRUE(storage->Write(kFile - 1, &shadow[kFile - 1], 1).ok());
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < 60; ++i) {
      const size_t n = 1 + rng.UniformInt(30000);
      const size_t off = rng.UniformInt(static_cast<uint32_t>(kFile - n));
      std::vector<char> got(n, 0x5a);
      const Status st = storage->Read(off, got.data(), n);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_EQ(0, std::memcmp(got.data(), shadow.data() + off, n)) << "read " << off << "+" << n;
    }
    ASSERT_TRUE(storage->Flush().ok());
    storage.reset();
    storage = OpenStorage(GetParam(), path, o);  // a fresh object: no checksum index, same bytes
  }
}

// Many requests in one batch, writes and reads that overlap: they take effect in submission order.
TEST_P(StorageRoundTripTest, BatchedOverlappingRequestsKeepSubmissionOrder) {
  IoUringStorageOptions o;
  o.slab_bytes = 8192;
  o.queue_depth = 3;
  auto storage = OpenStorage(GetParam(), Path(), o);
  const std::vector<char> a = RandomBytes(30000, 1), b = RandomBytes(30000, 2);
  std::vector<char> read_mid(30000), read_end(30000);
  std::vector<char> small[8];
  std::vector<IoRequest> batch = {
      {IoKind::kWrite, 100, const_cast<char*>(a.data()), a.size()},
      {IoKind::kRead, 100, read_mid.data(), read_mid.size()},         // sees a
      {IoKind::kWrite, 5000, const_cast<char*>(b.data()), b.size()},  // overlaps a
  };
  for (int k = 0; k < 8; ++k) {  // adjacent unaligned writes sharing edge blocks
    small[k] = RandomBytes(777, 10 + k);
    batch.push_back({IoKind::kWrite, 40000 + 777 * static_cast<uint64_t>(k), small[k].data(), 777});
  }
  batch.push_back({IoKind::kRead, 100, read_end.data(), read_end.size()});  // sees a then b
  auto ticket = storage->Submit(batch);
  ASSERT_TRUE(ticket.ok()) << ticket.status().ToString();
  auto results = storage->Wait(*ticket);
  ASSERT_TRUE(results.ok()) << results.status().ToString();
  ASSERT_EQ(results->size(), batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    EXPECT_TRUE((*results)[i].status.ok()) << (*results)[i].status.ToString();
    EXPECT_EQ((*results)[i].num_bytes_done, batch[i].num_bytes) << i;
  }
  EXPECT_EQ(0, std::memcmp(read_mid.data(), a.data(), a.size()));
  std::vector<char> expect(a);
  std::memcpy(expect.data() + 4900, b.data(), expect.size() - 4900);
  EXPECT_EQ(0, std::memcmp(read_end.data(), expect.data(), expect.size()));
  std::vector<char> smalls(8 * 777);
  ASSERT_TRUE(storage->Read(40000, smalls.data(), smalls.size()).ok());
  for (int k = 0; k < 8; ++k) {
    EXPECT_EQ(0, std::memcmp(smalls.data() + 777 * k, small[k].data(), 777)) << k;
  }
  EXPECT_EQ(storage->Wait(*ticket).status().code(), StatusCode::kNotFound);  // already waited
}

TEST_P(StorageRoundTripTest, ReadPastEndIsOutOfRange) {
  auto storage = OpenStorage(GetParam(), Path());
  const std::vector<char> data = RandomBytes(10000, 3);
  ASSERT_TRUE(storage->Write(0, data.data(), data.size()).ok());
  auto size = storage->SizeBytes();
  ASSERT_TRUE(size.ok());
  std::vector<char> out(100);
  const Status st = storage->Read(*size + 10, out.data(), out.size());
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st.ToString();
  EXPECT_NE(st.message().find(storage->path()), std::string::npos) << st.message();
}

INSTANTIATE_TEST_SUITE_P(AllImpls, StorageRoundTripTest,
                         ::testing::Values(Impl::kPosix, Impl::kUringDirect, Impl::kUringBuffered,
                                           Impl::kUringShm));

// A byte flipped on disk behind the engine's back is caught by the block checksum on read.
TEST(IoUringStorageTest, CorruptionOnDiskIsDataLoss) {
  TempDir dir;
  const std::string path = dir.Join("c.bin");
  auto storage = IoUringStorage::Open(path, {});
  ASSERT_TRUE(storage.ok()) << storage.status().ToString();
  const std::vector<char> data = RandomBytes(3 * 4096 + 123, 5);
  ASSERT_TRUE((*storage)->Write(1000, data.data(), data.size()).ok());
  std::vector<char> out(data.size());
  ASSERT_TRUE((*storage)->Read(1000, out.data(), out.size()).ok());
  const int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  char c = 0;
  ASSERT_EQ(::pread(fd, &c, 1, 2 * 4096 + 7), 1);
  c = static_cast<char>(c ^ 0x10);
  ASSERT_EQ(::pwrite(fd, &c, 1, 2 * 4096 + 7), 1);
  ::fsync(fd);
  ::close(fd);
  // O_DIRECT reads go to the disk; the page cache copy was updated by pwrite either way.
  const Status st = (*storage)->Read(1000, out.data(), out.size());
  EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st.ToString();
  EXPECT_NE(st.message().find("checksum mismatch"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("block 2"), std::string::npos) << st.message();
  // A read that avoids the corrupted block still succeeds.
  EXPECT_TRUE((*storage)->Read(1000, out.data(), 4096).ok());
}

TEST(IoUringStorageTest, UnalignedExistingFileIsRefusedUnderDirectIo) {
  TempDir dir;
  const std::string path = dir.Join("odd.bin");
  {
    auto posix = PosixStorage::Open(path);
    ASSERT_TRUE(posix.ok());
    const std::vector<char> data = RandomBytes(5000, 6);
    ASSERT_TRUE((*posix)->Write(0, data.data(), data.size()).ok());
  }
  auto direct = IoUringStorage::Open(path, {});
  ASSERT_FALSE(direct.ok());
  EXPECT_EQ(direct.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(direct.status().message().find("5000 bytes"), std::string::npos)
      << direct.status().message();
  IoUringStorageOptions buffered;
  buffered.direct_io = false;
  auto ok = IoUringStorage::Open(path, buffered);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  std::vector<char> out(5000);
  EXPECT_TRUE((*ok)->Read(0, out.data(), out.size()).ok());
  EXPECT_EQ(0, std::memcmp(out.data(), RandomBytes(5000, 6).data(), 5000));
}

TEST(IoUringStorageTest, BadOptionsAndMissingFile) {
  TempDir dir;
  IoUringStorageOptions o;
  o.block_bytes = 1000;
  EXPECT_EQ(IoUringStorage::Open(dir.Join("a"), o).status().code(), StatusCode::kInvalidArgument);
  o = {};
  o.slab_bytes = 4096 * 3 + 1;
  EXPECT_EQ(IoUringStorage::Open(dir.Join("a"), o).status().code(), StatusCode::kInvalidArgument);
  o = {};
  o.create = false;
  EXPECT_EQ(IoUringStorage::Open(dir.Join("missing"), o).status().code(), StatusCode::kNotFound);
}

// Queue depth 1, unregistered buffers, 8 KiB blocks, fewer slabs than requests: the same bytes.
TEST(IoUringStorageTest, TinyQueueUnregisteredBuffersAndLargeBlocks) {
  TempDir dir;
  IoUringStorageOptions o;
  o.queue_depth = 1;
  o.submit_batch = 1;
  o.num_slabs = 1;
  o.register_buffers = false;
  o.block_bytes = 8192;
  o.slab_bytes = 16384;
  auto storage = IoUringStorage::Open(dir.Join("t.bin"), o);
  ASSERT_TRUE(storage.ok()) << storage.status().ToString();
  EXPECT_FALSE((*storage)->fixed_buffers());
  std::vector<char> shadow(70000, 0);
  std::vector<std::vector<char>> datas;
  std::vector<IoRequest> batch;
  Rng rng(5);
  for (int i = 0; i < 12; ++i) {
    const size_t n = 1 + rng.UniformInt(20000);
    const size_t off = rng.UniformInt(static_cast<uint32_t>(shadow.size() - n));
    datas.push_back(RandomBytes(n, 50 + i));
    std::memcpy(shadow.data() + off, datas.back().data(), n);
    batch.push_back({IoKind::kWrite, off, datas.back().data(), n});
  }
  ASSERT_TRUE((*storage)->Transfer(batch).ok());
  ASSERT_TRUE((*storage)->Write(shadow.size() - 1, &shadow.back(), 1).ok());
  std::vector<char> got(shadow.size());
  ASSERT_TRUE((*storage)->Read(0, got.data(), got.size()).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), shadow.data(), shadow.size()));
  EXPECT_EQ(*(*storage)->SizeBytes() % 8192, 0u);
}

TEST(IoUringStorageTest, ReportsEngineStatistics) {
  TempDir dir;
  IoUringStorageOptions o;
  o.slab_bytes = 8192;
  auto storage = IoUringStorage::Open(dir.Join("s.bin"), o);
  ASSERT_TRUE(storage.ok());
  const std::vector<char> data = RandomBytes(20000, 9);
  ASSERT_TRUE((*storage)->Write(10, data.data(), data.size()).ok());
  const IoUringStorageStats s = (*storage)->stats();
  EXPECT_EQ(s.num_ops_submitted, 3);  // [0, 20480) in 8192-byte segments
  EXPECT_EQ(s.bytes_written, 20480);
  EXPECT_EQ(s.num_rmw_reads, 2);  // head and tail edge blocks
  EXPECT_GE(s.num_submit_calls, 1);
}

}  // namespace
}  // namespace tandem::offload
