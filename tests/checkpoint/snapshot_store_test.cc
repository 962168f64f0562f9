// The double-buffered shared-memory snapshot store: the version protocol, and a writer process
// killed with SIGKILL in the middle of its copy (previous version intact, new one never published).
#include "checkpoint/snapshot_store.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "checkpoint/erasure.h"

namespace tandem::checkpoint {
namespace {

std::string UniquePrefix(const char* what) {
  return StrCat("tandem-test-", getpid(), "-", what, "-",
                std::chrono::steady_clock::now().time_since_epoch().count() % 1000000);
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

// The trainer side of one version: begin (agent), write through the mapping, commit (agent).
void WriteVersion(SnapshotStore& store, ShardMapping& map, int rank, uint64_t version,
                  const std::vector<uint8_t>& bytes) {
  auto slot = store.BeginVersion(rank, version);
  ASSERT_TRUE(slot.ok()) << slot.status().ToString();
  std::memcpy(map.slot_data(*slot), bytes.data(), bytes.size());
  Status s = store.CommitVersion(rank, version, bytes.size(), Crc32(0, bytes.data(), bytes.size()));
  ASSERT_TRUE(s.ok()) << s.ToString();
}

void ExpectHolds(const SnapshotStore& store, int rank, uint64_t version,
                 const std::vector<uint8_t>& bytes) {
  auto view = store.Find(rank, version);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  ASSERT_EQ(view->num_bytes, bytes.size());
  EXPECT_EQ(std::memcmp(view->data, bytes.data(), bytes.size()), 0)
      << "rank " << rank << " version " << version << " differs";
}

TEST(SnapshotStore, VersionProtocol) {
  auto store = SnapshotStore::Create(UniquePrefix("proto"));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  SnapshotStore& s = **store;
  const size_t kBytes = 100003;
  auto n0 = s.RegisterRank(0, kBytes);
  auto n1 = s.RegisterRank(1, kBytes);
  ASSERT_TRUE(n0.ok() && n1.ok());
  auto m0 = ShardMapping::Open(*n0);
  auto m1 = ShardMapping::Open(*n1);
  ASSERT_TRUE(m0.ok() && m1.ok()) << m0.status().ToString();
  EXPECT_EQ(m1->rank(), 1);
  EXPECT_EQ(m1->capacity_bytes(), kBytes);
  EXPECT_FALSE(s.latest_complete().has_value());

  std::vector<std::vector<uint8_t>> v1 = {RandomBytes(kBytes, 1), RandomBytes(kBytes - 7, 2)};
  WriteVersion(s, *m0, 0, 1, v1[0]);
  EXPECT_FALSE(s.AllCommitted(1));  // rank 1 has not committed
  EXPECT_FALSE(s.Publish(1).ok());
  WriteVersion(s, *m1, 1, 1, v1[1]);
  ASSERT_TRUE(s.AllCommitted(1));
  ASSERT_TRUE(s.Publish(1).ok());
  EXPECT_EQ(s.latest_complete(), 1u);

  // Versions 2, 3, 4 alternate slots and never touch the newest complete one.
  std::vector<uint8_t> prev0 = v1[0], prev1 = v1[1];
  for (uint64_t v = 2; v <= 4; ++v) {
    auto a = RandomBytes(kBytes, 10 * v), b = RandomBytes(kBytes, 10 * v + 1);
    WriteVersion(s, *m0, 0, v, a);
    ExpectHolds(s, 0, v - 1, prev0);  // still there while v is incomplete
    WriteVersion(s, *m1, 1, v, b);
    ASSERT_TRUE(s.Publish(v).ok());
    ExpectHolds(s, 0, v, a);
    ExpectHolds(s, 1, v, b);
    prev0 = a;
    prev1 = b;
  }
  EXPECT_EQ(s.latest_complete(), 4u);
  // Old or equal versions are refused; a torn write (bad CRC) is not committed.
  EXPECT_FALSE(s.BeginVersion(0, 4).ok());
  auto slot = s.BeginVersion(0, 5);
  ASSERT_TRUE(slot.ok());
  std::memset(m0->slot_data(*slot), 0xab, 64);
  Status bad = s.CommitVersion(0, 5, 64, 12345);
  EXPECT_EQ(bad.code(), StatusCode::kDataLoss) << bad.ToString();
  EXPECT_FALSE(s.Find(0, 5).ok());
  ExpectHolds(s, 0, 4, prev0);
  // Committing more than the capacity or an unbegun version fails.
  EXPECT_FALSE(s.CommitVersion(1, 5, 10, 0).ok());
  EXPECT_FALSE(s.BeginVersion(7, 5).ok());
}

TEST(SnapshotStore, WriterKilledMidCopyLeavesPreviousVersionIntact) {
  auto store = SnapshotStore::Create(UniquePrefix("kill"));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  SnapshotStore& s = **store;
  const size_t kBytes = 8 << 20;
  auto name = s.RegisterRank(0, kBytes);
  ASSERT_TRUE(name.ok());
  auto map = ShardMapping::Open(*name);
  ASSERT_TRUE(map.ok());
  std::vector<uint8_t> v1 = RandomBytes(kBytes, 21);
  WriteVersion(s, *map, 0, 1, v1);
  ASSERT_TRUE(s.Publish(1).ok());

  auto slot = s.BeginVersion(0, 2);
  ASSERT_TRUE(slot.ok());
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // the trainer: maps by name, copies slowly, would commit at the end
    auto m = ShardMapping::Open(*name);
    if (!m.ok()) _exit(3);
    uint8_t* dst = m->slot_data(*slot);
    char go = 1;
    for (size_t off = 0; off < kBytes; off += 4096) {
      std::memset(dst + off, 0x5a, 4096);
      if (off == kBytes / 4 && write(pipefd[1], &go, 1) != 1) _exit(4);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    _exit(0);  // never reached in time: the parent kills it mid-copy
  }
  close(pipefd[1]);
  char got = 0;
  ASSERT_EQ(read(pipefd[0], &got, 1), 1);  // the child is a quarter through its copy
  close(pipefd[0]);
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "the writer finished";

  EXPECT_EQ(map->slot_header(*slot).state, static_cast<uint32_t>(SlotState::kWriting));
  EXPECT_FALSE(s.AllCommitted(2));
  EXPECT_FALSE(s.Publish(2).ok());
  EXPECT_EQ(s.latest_complete(), 1u);
  ExpectHolds(s, 0, 1, v1);
  // The half-written bytes cannot be committed under the CRC a full write would have had.
  std::vector<uint8_t> full(kBytes, 0x5a);
  EXPECT_FALSE(s.CommitVersion(0, 2, kBytes, Crc32(0, full.data(), full.size())).ok());
  // A relaunched trainer writes version 2 again into the same (incomplete) slot.
  auto again = s.BeginVersion(0, 2);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *slot);
  std::vector<uint8_t> v2 = RandomBytes(kBytes, 22);
  std::memcpy(map->slot_data(*again), v2.data(), v2.size());
  ASSERT_TRUE(s.CommitVersion(0, 2, kBytes, Crc32(0, v2.data(), v2.size())).ok());
  ASSERT_TRUE(s.Publish(2).ok());
  ExpectHolds(s, 0, 2, v2);
}

TEST(SnapshotStore, PutCommittedAndCleanup) {
  std::string prefix = UniquePrefix("put");
  std::string shm;
  {
    auto store = SnapshotStore::Create(prefix);
    ASSERT_TRUE(store.ok());
    auto name = (*store)->RegisterRank(3, 1000);
    ASSERT_TRUE(name.ok());
    shm = *name;
    std::vector<uint8_t> bytes = RandomBytes(999, 31);
    ASSERT_TRUE((*store)->PutCommitted(3, 9, bytes).ok());
    ASSERT_TRUE((*store)->Publish(9).ok());
    ExpectHolds(**store, 3, 9, bytes);
    EXPECT_FALSE((*store)->PutCommitted(3, 10, RandomBytes(1001, 32)).ok());
  }
  EXPECT_FALSE(ShardMapping::Open(shm).ok()) << "the store's destructor unlinks its regions";
}

}  // namespace
}  // namespace tandem::checkpoint
