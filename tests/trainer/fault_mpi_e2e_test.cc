// The fault matrix of issue #8 with real processes: `tandem train` under mpirun (dp2, 2 ranks)
// over 2 emulated nodes of 1 rank each, one `tandem agent` per node forming a group (k = 1,
// m = 1: node n's snapshot is mirrored as parity on the other node). Each case breaks the job at
// a random update, relaunches it with --resume and checks that it finishes, that it lost at most
// the snapshot interval (1 update) when a snapshot survives, and that the final weights and Adam
// moments are bitwise those of an uninterrupted mpirun run with the same config:
//   1. kill -9 one trainer rank (dp2, and dp2 with ZeRO-1): resumes from the agents' snapshot;
//   2. kill -9 a whole node (its agent and its rank): the agent restarts empty, REBUILD restores
//      its snapshot from the other node's parity, the relaunch resumes from the snapshot;
//   2b. the agents alone, deterministic: a rebuilt node serves both versions its peer kept (the
//      other node may not have published the newest yet; the job restores the newest version
//      every node holds);
//   3. both agents lost (more than m): REBUILD fails, the relaunch says there is no snapshot and
//      resumes from the universal checkpoint;
//   4. SIGSTOP one rank (a hang): the other rank's collective fails within parallel.timeout_s,
//      mpirun ends, the test kills the stopped rank and relaunches;
//   5. a rank's snapshot corrupted in its agent's memory (before the first universal checkpoint):
//      the agent refuses it (CRC), and every rank falls back together, here to a fresh start,
//      with no rank keeping the state it had restored.
// The test process is not under mpirun: it runs mpirun itself (shared memory transport only).
// f32 on the CPU; a tiny model so that an update takes milliseconds.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <fstream>
#include <random>
#include <regex>

#include "checkpoint/agent.h"
#include "checkpoint/snapshot_store.h"
#include "tests/trainer/fault_mpi_fixture.h"

namespace tandem::fault_testing {
namespace {

TEST_F(FaultMpiTest, KilledRankResumesFromTheSnapshot) { KillRankCase("rank", false); }

TEST_F(FaultMpiTest, KilledRankResumesFromTheSnapshotUnderZero1) { KillRankCase("zero", true); }

// Case 2: a whole node (its agent and its rank) lost with m = 1.
TEST_F(FaultMpiTest, LostNodeIsRebuiltFromParityAndResumesFromTheSnapshot) {
  StartAgents("node");
  const int64_t at = RandomStep(5, 50);
  const int node = static_cast<int>(gen_() % 2);
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed_ << ": node " << node << " lost after step " << at);
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  const pid_t pid = RankPid(job->pid(), node);
  ASSERT_GT(pid, 0);
  agents_[node]->Kill();  // the node's snapshot memory is gone with its agent
  kill(pid, SIGKILL);
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  StartAgent(node);
  auto client = checkpoint::AgentClient::Connect(Socket(node), 20);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  auto latest = client->LatestComplete();
  ASSERT_TRUE(latest.ok()) << latest.status().ToString();
  EXPECT_FALSE(latest->has_value()) << "a restarted agent must start empty";
  auto rebuilt = client->Rebuild();
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status().ToString() << "\n" << AgentLogs();
  ExpectResumedFromSnapshot(Relaunch("run", false), last);
  ExpectFinalEqualsReference("run", false);
}

// Case 2b, deterministic: node 1 published versions 1 and 2, node 0 only version 1 (its rank
// died before committing 2); node 1 is lost and rebuilt. The job restores version 1 (the newest
// every node holds), so the rebuilt node must hold version 1 as well as 2.
TEST_F(FaultMpiTest, RebuiltNodeHoldsBothVersionsItsPeerKept) {
  StartAgents("both-versions");
  constexpr uint64_t kCapacity = 20000;
  auto bytes = [](int rank, uint64_t v) {
    std::vector<uint8_t> b(kCapacity - 7 * v);
    std::mt19937 gen(rank * 100 + v);
    for (auto& x : b) x = static_cast<uint8_t>(gen());
    return b;
  };
  auto c0 = checkpoint::AgentClient::Connect(Socket(0), 20);
  auto c1 = checkpoint::AgentClient::Connect(Socket(1), 20);
  ASSERT_TRUE(c0.ok() && c1.ok());
  ASSERT_TRUE(c0->Register(0, kCapacity).ok());
  ASSERT_TRUE(c1->Register(1, kCapacity).ok());
  for (uint64_t v : {1, 2}) {
    auto done = c1->WriteVersion(1, v, bytes(1, v));
    ASSERT_TRUE(done.ok() && *done) << "node 1 did not publish version " << v;
  }
  auto done = c0->WriteVersion(0, 1, bytes(0, 1));
  ASSERT_TRUE(done.ok() && *done);
  agents_[1]->Kill();
  StartAgent(1);
  auto fresh = checkpoint::AgentClient::Connect(Socket(1), 20);
  ASSERT_TRUE(fresh.ok());
  auto rebuilt = fresh->Rebuild();
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status().ToString() << AgentLogs();
  EXPECT_EQ(*rebuilt, 2u);
  ASSERT_TRUE(fresh->Register(1, kCapacity).ok());
  for (uint64_t v : {1, 2}) {
    auto got = fresh->Restore(1, v);
    ASSERT_TRUE(got.ok()) << "version " << v << ": " << got.status().ToString();
    EXPECT_EQ(got->version, v);
    EXPECT_TRUE(got->bytes == bytes(1, v)) << "version " << v << " not bitwise equal";
  }
  if (std::getenv("TANDEM_FAULT_VERBOSE") != nullptr) std::printf("%s", AgentLogs().c_str());
}

// Case 3: both agents lost (more than m): the universal checkpoint, and the log says so.
TEST_F(FaultMpiTest, MoreThanMNodesLostResumesFromTheUniversalCheckpoint) {
  StartAgents("both");
  const int64_t at = RandomStep(30, 45);
  SCOPED_TRACE(::testing::Message() << "seed " << seed_ << ": both nodes lost after step " << at);
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  agents_[0]->Kill();
  agents_[1]->Kill();
  const pid_t pid = RankPid(job->pid(), 1);
  if (pid > 0) kill(pid, SIGKILL);
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  StartAgent(0);
  StartAgent(1);
  auto client = checkpoint::AgentClient::Connect(Socket(0), 20);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  auto rebuilt = client->Rebuild();
  EXPECT_FALSE(rebuilt.ok()) << "REBUILD found version " << *rebuilt << " with every node lost";
  const std::string log = Relaunch("run", false);
  EXPECT_NE(log.find("no complete snapshot in the agents"), std::string::npos) << log;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      log, m, std::regex("resumed from (\\S+/universal/step-([0-9]+)\\.h5) at step")))
      << log;
  EXPECT_EQ(fs::path(m[1].str()).parent_path(), fs::path(dir_.Join("run/checkpoints/universal")));
  const int64_t step = std::stoll(m[2]);
  EXPECT_EQ(step % 25, 0) << "not a save_interval step";
  EXPECT_GE(step, 25);
  EXPECT_LE(step, last);
  ExpectFinalEqualsReference("run", false);
}

// Case 4: a hung rank (SIGSTOP); the other rank's collective times out and ends the job.
TEST_F(FaultMpiTest, HungRankEndsTheJobWithinTheCollectiveTimeout) {
  StartAgents("hang");
  const int64_t at = RandomStep(5, 50);
  const int victim = static_cast<int>(gen_() % 2);
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed_ << ": SIGSTOP rank " << victim << " after step " << at);
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  const pid_t pid = RankPid(job->pid(), victim);
  ASSERT_GT(pid, 0);
  kill(pid, SIGSTOP);
  const auto stopped = Clock::now();
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const double took = std::chrono::duration<double>(Clock::now() - stopped).count();
  EXPECT_GE(took, kCollectiveTimeoutS * 0.8) << "the job ended before the collective timeout";
  kill(pid, SIGKILL);  // mpirun may leave a stopped process behind
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  ExpectResumedFromSnapshot(Relaunch("run", false), last);
  ExpectFinalEqualsReference("run", false);
}

// Flips one byte in every committed slot of rank `rank`'s shared-memory region (its data, so the
// agent's CRC check at RESTORE fails); returns how many slots were corrupted.
int CorruptCommittedSlots(const std::string& shm_file) {
  std::fstream f(shm_file, std::ios::in | std::ios::out | std::ios::binary);
  if (!f) return 0;
  checkpoint::RegionHeader h;
  f.read(reinterpret_cast<char*>(&h), sizeof(h));
  if (!f || h.magic != checkpoint::kRegionMagic) return 0;
  int corrupted = 0;
  for (int slot = 0; slot < 2; ++slot) {
    const checkpoint::SlotHeader& sh = h.slots[slot];
    if (sh.state != static_cast<uint32_t>(checkpoint::SlotState::kCommitted) || sh.num_bytes == 0)
      continue;
    const uint64_t at = h.data_offset[slot] + sh.num_bytes - 5;  // in the last tensor's data
    char b = 0;
    f.seekg(static_cast<std::streamoff>(at));
    f.read(&b, 1);
    b = static_cast<char>(b ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&b, 1);
    ++corrupted;
  }
  return f ? corrupted : 0;
}

TEST_F(FaultMpiTest, CorruptSnapshotFallsBackOnEveryRankAlike) {
  StartAgents("crc");
  const int64_t at = RandomStep(5, 20);
  const int node = static_cast<int>(gen_() % 2);
  SCOPED_TRACE(::testing::Message() << "seed " << seed_ << ": node " << node
                                    << "'s snapshot corrupted after step " << at);
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  const pid_t pid = RankPid(job->pid(), 1 - node);
  ASSERT_GT(pid, 0);
  kill(pid, SIGKILL);
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  ASSERT_GE(CorruptCommittedSlots(StrCat("/dev/shm/", ShmStem(), "-n", node, "-r", node)), 1)
      << "no committed snapshot of rank " << node << " in /dev/shm";
  const std::string log = Relaunch("run", false);
  EXPECT_NE(log.find(StrCat("r", node, " snapshot] cannot restore")), std::string::npos) << log;
  EXPECT_EQ(log.find("resumed from the in-memory snapshot"), std::string::npos) << log;
  EXPECT_EQ(log.find("resumed from /"), std::string::npos)
      << "no universal checkpoint before step 25:\n"
      << log;
  ExpectFinalEqualsReference("run", false);
}

}  // namespace
}  // namespace tandem::fault_testing
