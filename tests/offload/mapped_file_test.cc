// MappedFileAllocator: each allocation is a zero-filled file of whole 4096-byte blocks mapped
// shared; writes through the mapping are what a direct (O_DIRECT) read of the file returns, in
// place or after a change; PathOf finds the file from any byte inside; Deallocate removes it;
// a missing directory and a full disk are clear errors.
#include "offload/mapped_file.h"

#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <vector>

#include "core/tensor.h"
#include "offload/storage.h"
#include "tests/common/testing.h"

namespace tandem::offload {
namespace {

namespace fs = std::filesystem;
using tandem::testing::TempDir;

TEST(MappedFileAllocatorTest, WritesThroughTheMappingAreWhatDirectReadsSee) {
  TempDir dir;
  MappedFileAllocator files(dir.path());
  const size_t n = 3 * 4096 + 100;  // not a whole number of blocks
  StatusOr<void*> p = files.Allocate(n);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  char* bytes = static_cast<char*>(*p);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(bytes[i], 0) << i;
  StatusOr<std::string> path = files.PathOf(bytes + n - 1);
  ASSERT_TRUE(path.ok()) << path.status().ToString();
  EXPECT_EQ(fs::path(*path).parent_path(), fs::path(dir.path()));
  EXPECT_EQ(fs::file_size(*path), 4u * 4096);
  EXPECT_EQ(files.stats().bytes_in_use, 4u * 4096);
  EXPECT_FALSE(files.PathOf(bytes + 4 * 4096).ok());

  auto file = IoUringStorage::Open(*path, {.create = false, .verify_checksums = false});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  std::vector<char> got(n);
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    for (size_t i = 0; i < n; ++i) bytes[i] = static_cast<char>((i * 7 + round * 13) % 251);
    // Unaligned offset and size: the engine bounces through its slabs.
    ASSERT_TRUE((*file)->Read(5, got.data(), n - 9).ok());
    EXPECT_EQ(std::memcmp(got.data(), bytes + 5, n - 9), 0);
  }
  file->reset();
  files.Deallocate(*p, n);
  EXPECT_FALSE(fs::exists(*path));
  EXPECT_EQ(files.stats().bytes_in_use, 0u);
}

TEST(MappedFileAllocatorTest, HoldsTensorsAndGivesEachAllocationItsOwnFile) {
  TempDir dir;
  MappedFileAllocator files(dir.path());
  {
    StatusOr<Tensor> a = Tensor::Empty({1000}, DType::kF32, files);
    StatusOr<Tensor> b = Tensor::Empty({10}, DType::kBF16, files);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_NE(*files.PathOf(a->raw_data()), *files.PathOf(b->raw_data()));
    int count = 0;
    for (const auto& e : fs::directory_iterator(dir.path())) count += e.is_regular_file();
    EXPECT_EQ(count, 2);
  }
  int count = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) count += e.is_regular_file();
  EXPECT_EQ(count, 0);
}

TEST(MappedFileAllocatorTest, MissingDirectoryAndFullDiskAreClearErrors) {
  TempDir dir;
  MappedFileAllocator missing(dir.Join("nope"));
  StatusOr<void*> p = missing.Allocate(100);
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kNotFound);
  EXPECT_NE(p.status().message().find("nope"), std::string::npos) << p.status().ToString();

  // A file-size limit stands in for a full disk: the reservation fails up front (EFBIG is
  // reported as the errno mapping decides; ENOSPC would be ResourceExhausted).
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  small.rlim_cur = 8192;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  signal(SIGXFSZ, SIG_IGN);
  MappedFileAllocator files(dir.path());
  StatusOr<void*> big = files.Allocate(1 << 20);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("reserving"), std::string::npos) << big.status().ToString();
  int count = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) count += e.is_regular_file();
  EXPECT_EQ(count, 0);  // nothing left behind
}

}  // namespace
}  // namespace tandem::offload
