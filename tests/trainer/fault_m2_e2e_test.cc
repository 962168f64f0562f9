// The two cases of issue #8's fault matrix that fault_mpi_e2e_test.cc (k = 1, m = 1) leaves out,
// on a group of 4 emulated nodes of one rank each (4 `tandem agent`s, k = 2, m = 2: node n's
// snapshot image is split into data fragments 0 and 1 and Reed-Solomon parity fragments 2 and 3;
// fragment j lives on node (n + j) % 4, fragment 0 on n itself, in its shared memory):
//   1. m = 2 nodes lost at once (their agents and ranks): both agents restart empty, REBUILD each
//      from the two survivors' fragments, and the relaunched job (dp4) resumes from the in-memory
//      snapshot, its final weights and Adam moments bitwise those of an uninterrupted run; the
//      agents alone, deterministically, for every pair of the 4 nodes, and with ranks on only 2
//      of the 4 nodes (k + m may exceed the trainer nodes);
//   2. a corrupted fragment held by a surviving agent (the test hook TEST_CORRUPT flips a payload
//      byte in the agent's memory, the fragment keeps its CRC): the rebuild of a lost node refuses
//      it with a message naming the holder, node, version and fragment, and rebuilds from the
//      other fragments; a parity fragment under the job, a data fragment and a too-corrupted
//      newest version (falls back to the older version, and says so) with the agents alone; and
//      under the job, a corrupt parity fragment the rebuild needs (two adjacent nodes lost): the
//      rebuild fails with DATA_LOSS, installs nothing, and the job resumes from the universal
//      checkpoint.
// The test process runs mpirun itself (shared memory transport); f32 on the CPU, a tiny model.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/agent.h"
#include "tests/trainer/fault_mpi_fixture.h"

namespace tandem::fault_testing {
namespace {

constexpr int kNodes = 4;
constexpr int kParity = 2;
constexpr uint64_t kCapacity = 24000;

class FaultM2Test : public FaultMpiTest {
 protected:
  FaultM2Test() {
    nodes_ = kNodes;
    m_ = kParity;
    test_hooks_ = true;
  }

  // Rank `rank`'s snapshot bytes of version v (sizes differ by rank and version).
  static std::vector<uint8_t> Bytes(int rank, uint64_t v) {
    std::vector<uint8_t> b(kCapacity - 13 * v - 101 * rank);
    std::mt19937 gen(static_cast<uint32_t>(rank * 1000 + v));
    for (auto& x : b) x = static_cast<uint8_t>(gen());
    return b;
  }
  // Every node's rank (rank = node) writes versions `first` and `first + 1`; each is published
  // once its parity is acknowledged by the other three nodes.
  void WriteTwoVersionsEverywhere(uint64_t first) {
    for (int node = 0; node < kNodes; ++node) {
      auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      ASSERT_TRUE(c->Register(node, kCapacity).ok());
      for (uint64_t v : {first, first + 1}) {
        auto done = c->WriteVersion(node, v, Bytes(node, v));
        ASSERT_TRUE(done.ok() && *done) << "node " << node << " did not publish version " << v
                                        << ": " << done.status().ToString() << AgentLogs();
      }
    }
  }
  // Rebuilds node `node` (restarted empty); expects version `want` as the newest it got.
  void ExpectRebuilt(int node, uint64_t want) {
    auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    auto latest = c->LatestComplete();
    ASSERT_TRUE(latest.ok() && !latest->has_value()) << "a restarted agent must start empty";
    auto rebuilt = c->Rebuild();
    ASSERT_TRUE(rebuilt.ok()) << "node " << node << ": " << rebuilt.status().ToString()
                              << AgentLogs();
    EXPECT_EQ(*rebuilt, want) << "node " << node;
  }
  // Node `node`'s restored version v is bitwise what its rank wrote.
  void ExpectRestores(int node, uint64_t v) {
    auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
    ASSERT_TRUE(c.ok());
    ASSERT_TRUE(c->Register(node, kCapacity).ok());
    auto got = c->Restore(node, v);
    ASSERT_TRUE(got.ok()) << "node " << node << " version " << v << ": " << got.status().ToString();
    EXPECT_EQ(got->version, v);
    EXPECT_TRUE(got->bytes == Bytes(node, v))
        << "node " << node << " version " << v << " is not bitwise what its rank wrote";
  }
  // Corrupts what node `holder` keeps of node `owner` (every version, or `version`); returns the
  // agent's "v:i,..." list of the fragments hit.
  std::string Corrupt(int holder, int owner, std::optional<uint64_t> version = {}) {
    auto c = checkpoint::AgentClient::Connect(Socket(holder), 20);
    EXPECT_TRUE(c.ok());
    if (!c.ok()) return "";
    auto hit = c->CorruptHeldFragmentsForTest(owner, version);
    EXPECT_TRUE(hit.ok()) << hit.status().ToString();
    return hit.ok() ? *hit : "";
  }
  // The log of node `node`'s latest agent.
  std::string LatestAgentLog(int node) const {
    for (int i = agent_starts_; i >= 1; --i) {
      const std::string p = dir_.Join(StrCat("agent", node, "-", i, ".log"));
      if (fs::exists(p)) return ReadFile(p);
    }
    return "";
  }
  // The agent log of node `node`'s latest start says it refused fragment `index` of `version`.
  void ExpectRefusedInLog(int node, int holder, uint64_t version, int index) {
    const std::string want = StrCat("rebuild of node ", node, ": refused a fragment held by node ",
                                    holder, ": fragment: payload CRC mismatch");
    const std::string where =
        StrCat("(node ", node, " version ", version, " fragment ", index, ")");
    const std::string log = LatestAgentLog(node);
    const size_t at = log.find(want);
    ASSERT_NE(at, std::string::npos) << "no refusal of node " << holder << "'s fragment:\n" << log;
    EXPECT_NE(log.find(where, at), std::string::npos) << log;
  }
  // A random node and a different one.
  std::pair<int, int> RandomPair() {
    const int a = static_cast<int>(gen_() % kNodes);
    const int b = (a + 1 + static_cast<int>(gen_() % (kNodes - 1))) % kNodes;
    return {a, b};
  }
};

// The agents alone: every pair of the 4 nodes lost in turn, both rebuilt from the other two
// (adjacent pairs leave a node only its two parity fragments), both versions bitwise back.
TEST_F(FaultM2Test, EveryPairOfLostNodesIsRebuiltFromTheOtherTwo) {
  StartAgents("pairs");
  uint64_t first = 1;
  for (int a = 0; a < kNodes; ++a) {
    for (int b = a + 1; b < kNodes; ++b, first += 2) {
      SCOPED_TRACE(::testing::Message() << "nodes " << a << " and " << b << " lost");
      WriteTwoVersionsEverywhere(first);  // also restores the parity the last pair lost
      if (HasFatalFailure()) return;
      agents_[a]->Kill();
      agents_[b]->Kill();
      StartAgent(a);
      StartAgent(b);
      ExpectRebuilt(a, first + 1);
      ExpectRebuilt(b, first + 1);
      for (int node : {a, b}) {
        for (uint64_t v : {first, first + 1}) ExpectRestores(node, v);
      }
      if (HasFatalFailure()) return;
    }
  }
}

// The agents alone: k + m may exceed the trainer nodes; agents 2 and 3 have no ranks and only
// hold fragments. Nodes 0 and 1 (every node with ranks) lost: both rebuilt from those two.
TEST_F(FaultM2Test, AgentsWithoutRanksHoldEnoughToRebuildBothTrainerNodes) {
  StartAgents("no-ranks");
  for (int node : {0, 1}) {
    auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_TRUE(c->Register(node, kCapacity).ok());
    for (uint64_t v : {1, 2}) {
      auto done = c->WriteVersion(node, v, Bytes(node, v));
      ASSERT_TRUE(done.ok() && *done) << done.status().ToString() << AgentLogs();
    }
  }
  agents_[0]->Kill();
  agents_[1]->Kill();
  StartAgent(0);
  StartAgent(1);
  for (int node : {0, 1}) {
    ExpectRebuilt(node, 2);
    for (uint64_t v : {1, 2}) ExpectRestores(node, v);
  }
}

// The agents alone: a corrupt parity fragment (case a) or data fragment (case b) of the lost node
// is refused, naming it, and the node is rebuilt bitwise from the two other fragments.
TEST_F(FaultM2Test, CorruptFragmentIsRefusedAndTheRebuildUsesTheOthers) {
  StartAgents("corrupt-one");
  uint64_t first = 1;
  for (int index : {2, 1}) {  // parity, then data
    const int node = static_cast<int>(gen_() % kNodes);
    const int holder = (node + index) % kNodes;
    SCOPED_TRACE(::testing::Message()
                 << "seed " << seed_ << ": node " << node << " lost, its "
                 << "fragment " << index << " on node " << holder << " corrupted");
    WriteTwoVersionsEverywhere(first);
    if (HasFatalFailure()) return;
    EXPECT_EQ(Corrupt(holder, node), StrCat(first, ":", index, ",", first + 1, ":", index));
    agents_[node]->Kill();
    StartAgent(node);
    ExpectRebuilt(node, first + 1);
    for (uint64_t v : {first, first + 1}) {
      ExpectRestores(node, v);
      ExpectRefusedInLog(node, holder, v, index);
    }
    if (HasFatalFailure()) return;
    first += 2;
  }
}

// The agents alone: the newest version of the lost node keeps one valid fragment of the three
// its peers held (more than m lost): the rebuild refuses the two corrupt ones, falls back to the
// older version, says so, and installs nothing of the newest. With every version corrupt
// REBUILD fails with DataLoss.
TEST_F(FaultM2Test, TooManyCorruptFragmentsFallBackToTheOlderVersion) {
  StartAgents("corrupt-two");
  WriteTwoVersionsEverywhere(1);
  if (HasFatalFailure()) return;
  const int node = static_cast<int>(gen_() % kNodes);
  SCOPED_TRACE(::testing::Message() << "seed " << seed_ << ": node " << node << " lost");
  EXPECT_EQ(Corrupt((node + 1) % kNodes, node, 2), "2:1");
  EXPECT_EQ(Corrupt((node + 2) % kNodes, node, 2), "2:2");
  agents_[node]->Kill();
  StartAgent(node);
  ExpectRebuilt(node, 1);
  ExpectRestores(node, 1);
  auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
  ASSERT_TRUE(c.ok());
  auto newest = c->Restore(node, 2);
  EXPECT_FALSE(newest.ok()) << "version 2 was installed from corrupt fragments";
  const std::string log = LatestAgentLog(node);
  EXPECT_NE(log.find(StrCat("falling back to version 1, the newest with 2 valid fragments")),
            std::string::npos)
      << log;
  ExpectRefusedInLog(node, (node + 2) % kNodes, 2, 2);

  // Every fragment of every version corrupt on two holders: nothing can be rebuilt.
  const int other = (node + 1) % kNodes;
  WriteTwoVersionsEverywhere(3);
  if (HasFatalFailure()) return;
  EXPECT_EQ(Corrupt((other + 1) % kNodes, other), "3:1,4:1");
  EXPECT_EQ(Corrupt((other + 3) % kNodes, other), "3:3,4:3");
  agents_[other]->Kill();
  StartAgent(other);
  auto fresh = checkpoint::AgentClient::Connect(Socket(other), 20);
  ASSERT_TRUE(fresh.ok());
  auto failed = fresh->Rebuild();
  ASSERT_FALSE(failed.ok()) << "rebuilt version " << *failed << " from one valid fragment";
  EXPECT_EQ(failed.status().code(), StatusCode::kDataLoss) << failed.status().ToString();
  auto latest = fresh->LatestComplete();
  EXPECT_TRUE(latest.ok() && !latest->has_value()) << "a failed rebuild installed a version";
  if (std::getenv("TANDEM_FAULT_VERBOSE") != nullptr) std::printf("%s", AgentLogs().c_str());
}

// The hook is refused by an agent not started for tests.
TEST_F(FaultM2Test, CorruptHookNeedsTestHooks) {
  test_hooks_ = false;
  StartAgents("no-hooks");
  auto c = checkpoint::AgentClient::Connect(Socket(0), 20);
  ASSERT_TRUE(c.ok());
  auto hit = c->CorruptHeldFragmentsForTest(1);
  ASSERT_FALSE(hit.ok());
  EXPECT_NE(hit.status().message().find("--test-hooks"), std::string::npos)
      << hit.status().ToString();
}

// Case 1 under the job: two whole nodes (agents and ranks) lost at a random update of dp4.
TEST_F(FaultM2Test, TwoLostNodesAreRebuiltAndTheJobResumesFromTheSnapshot) {
  StartAgents("two-nodes");
  const int64_t at = RandomStep(5, 50);
  const auto [a, b] = RandomPair();
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed_ << ": nodes " << a << " and " << b << " lost after step " << at);
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  const pid_t pa = RankPid(job->pid(), a), pb = RankPid(job->pid(), b);
  ASSERT_GT(pa, 0);
  ASSERT_GT(pb, 0);
  agents_[a]->Kill();  // the nodes' snapshot memory is gone with their agents
  agents_[b]->Kill();
  kill(pa, SIGKILL);
  kill(pb, SIGKILL);
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  StartAgent(a);
  StartAgent(b);
  for (int node : {a, b}) {
    auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    auto rebuilt = c->Rebuild();
    ASSERT_TRUE(rebuilt.ok()) << "node " << node << ": " << rebuilt.status().ToString()
                              << AgentLogs();
  }
  ExpectResumedFromSnapshot(Relaunch("run", false), last);
  ExpectFinalEqualsReference("run", false);
}

// Case 2 under the job: with the job stopped, the parity fragment (index 2) a survivor holds of
// node X is corrupted, then X is lost: its rebuild refuses that fragment and decodes from data
// fragment 1 and parity fragment 3; the job resumes from the snapshot, bitwise.
TEST_F(FaultM2Test, CorruptParityIsRefusedAndTheLostNodeIsRebuiltFromTheRest) {
  StartAgents("parity");
  const int64_t at = RandomStep(5, 50);
  const int node = static_cast<int>(gen_() % kNodes);
  const int holder = (node + 2) % kNodes;
  SCOPED_TRACE(::testing::Message() << "seed " << seed_ << ": node " << node << " lost after step "
                                    << at << ", its parity on node " << holder << " corrupted");
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  const pid_t pid = RankPid(job->pid(), node);
  ASSERT_GT(pid, 0);
  kill(pid, SIGKILL);
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  const std::string hit = Corrupt(holder, node);
  std::smatch m;
  ASSERT_TRUE(std::regex_match(hit, m, std::regex("([0-9]+):2,([0-9]+):2"))) << hit;
  agents_[node]->Kill();
  StartAgent(node);
  auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto rebuilt = c->Rebuild();
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status().ToString() << AgentLogs();
  EXPECT_EQ(*rebuilt, std::stoull(m[2])) << "the newest version the survivors held";
  for (int i = 1; i <= 2; ++i) ExpectRefusedInLog(node, holder, std::stoull(m[i]), 2);
  ExpectResumedFromSnapshot(Relaunch("run", false), last);
  ExpectFinalEqualsReference("run", false);
}

// Case 2 where the rebuild needs the corrupted parity: two adjacent nodes X and X+1 lost leave X
// only its parity fragments 2 and 3, and fragment 2 is corrupt: X cannot be rebuilt (DATA_LOSS,
// nothing installed), X+1 can; the relaunch says there is no complete snapshot and resumes from
// the newest universal checkpoint (same mesh), bitwise.
TEST_F(FaultM2Test, CorruptParityTheRebuildNeedsFallsBackToTheUniversalCheckpoint) {
  StartAgents("needed");
  const int64_t at = RandomStep(30, 45);
  const int node = static_cast<int>(gen_() % kNodes);
  const int next = (node + 1) % kNodes, holder = (node + 2) % kNodes;
  SCOPED_TRACE(::testing::Message()
               << "seed " << seed_ << ": nodes " << node << " and " << next << " lost after step "
               << at << ", parity 2 of " << node << " on node " << holder << " corrupted");
  Reference(false);
  auto job = StartJobUntil("run", false, at);
  for (int n : {node, next}) {
    const pid_t pid = RankPid(job->pid(), n);
    ASSERT_GT(pid, 0);
    kill(pid, SIGKILL);
  }
  ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
  const int64_t last = HeartbeatStep(Heartbeat("run"));
  const std::string hit = Corrupt(holder, node);
  std::smatch v;
  ASSERT_TRUE(std::regex_match(hit, v, std::regex("([0-9]+):2,([0-9]+):2"))) << hit;
  agents_[node]->Kill();
  agents_[next]->Kill();
  StartAgent(node);
  StartAgent(next);
  auto c = checkpoint::AgentClient::Connect(Socket(node), 20);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto failed = c->Rebuild();
  ASSERT_FALSE(failed.ok()) << "node " << node << " rebuilt version " << *failed
                            << " from one valid fragment";
  EXPECT_EQ(failed.status().code(), StatusCode::kDataLoss) << failed.status().ToString();
  for (int i = 1; i <= 2; ++i) ExpectRefusedInLog(node, holder, std::stoull(v[i]), 2);
  auto latest = c->LatestComplete();
  EXPECT_TRUE(latest.ok() && !latest->has_value()) << "a failed rebuild installed a version";
  auto d = checkpoint::AgentClient::Connect(Socket(next), 20);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  auto rebuilt = d->Rebuild();
  EXPECT_TRUE(rebuilt.ok()) << "node " << next << ": " << rebuilt.status().ToString();
  const std::string log = Relaunch("run", false);
  EXPECT_NE(log.find("no complete snapshot in the agents"), std::string::npos) << log;
  std::smatch m;
  const std::regex universal("resumed from \\S+/universal/step-([0-9]+)\\.h5");
  ASSERT_TRUE(std::regex_search(log, m, universal)) << log;
  EXPECT_EQ(std::stoll(m[1]), 25) << "the newest universal checkpoint before step " << last;
  ExpectFinalEqualsReference("run", false);
}

}  // namespace
}  // namespace tandem::fault_testing
