// The snapshot agent as separate processes: a trainer killed with SIGKILL mid-write and a new
// trainer restoring the newest complete version bitwise; an agent restart answering "no
// snapshot"; heartbeats; three agents (k=2, m=1) over libfabric tcp rebuilding a killed agent's
// node from the others' fragments, and refusing to publish while a peer misses its fragment.
// (k=2, m=2 with two nodes lost: agent_slow_test.cc.)
#include "checkpoint/agent.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "tests/checkpoint/agent_test_util.h"

namespace tandem::checkpoint {
namespace {

using namespace testing_agent;  // NOLINT: test helpers

TEST(Agent, KilledTrainerIsRestoredFromTheNewestCompleteVersion) {
  Agents agents;
  AgentOptions o{.socket_path = SocketPath("kill")};
  pid_t agent = agents.Start(o);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t trainer = fork();
  if (trainer == 0) {  // commits versions 1..3, then dies in the middle of writing version 4
    auto c = AgentClient::Connect(o.socket_path, 20);
    if (!c.ok() || !c->Register(0, kBytes).ok() || !c->Register(1, kBytes).ok()) _exit(2);
    for (uint64_t v = 1; v <= 3; ++v) {
      if (!c->WriteVersion(0, v, Shard(0, v)).ok()) _exit(3);
      auto done = c->WriteVersion(1, v, Shard(1, v));
      if (!done.ok() || !*done) _exit(4);
    }
    auto dst = c->BeginVersion(0, 4);
    if (!dst.ok()) _exit(5);
    std::memset(*dst, 0xee, kBytes / 2);
    char x = 1;
    if (write(ready[1], &x, 1) != 1) _exit(6);
    std::this_thread::sleep_for(std::chrono::seconds(60));
    _exit(7);
  }
  close(ready[1]);
  char x = 0;
  ASSERT_EQ(read(ready[0], &x, 1), 1) << "the trainer failed before version 4";
  close(ready[0]);
  ASSERT_EQ(kill(trainer, SIGKILL), 0);
  waitpid(trainer, nullptr, 0);

  AgentClient c = MustConnect(o.socket_path);  // the relaunched trainer
  ASSERT_TRUE(c.Register(0, kBytes).ok());
  ASSERT_TRUE(c.Register(1, kBytes).ok());
  auto latest = c.LatestComplete();
  ASSERT_TRUE(latest.ok()) << latest.status().ToString();
  ASSERT_EQ(*latest, std::optional<uint64_t>(3));
  ExpectRestores(c, 0, 3);
  ExpectRestores(c, 1, 3);
  WriteBoth(c, 0, 1, 4);  // and it carries on
  ExpectRestores(c, 1, 4);
  ASSERT_TRUE(c.Shutdown().ok());
  int status = agents.Wait(agent);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

TEST(Agent, RestartedAgentSaysNoSnapshot) {
  Agents agents;
  AgentOptions o{.socket_path = SocketPath("restart")};
  pid_t agent = agents.Start(o);
  {
    AgentClient c = MustConnect(o.socket_path);
    ASSERT_TRUE(c.Register(0, kBytes).ok());
    ASSERT_TRUE(c.Register(1, kBytes).ok());
    WriteBoth(c, 0, 1, 1);
  }
  agents.Kill(agent);
  agents.Start(o);
  AgentClient c = MustConnect(o.socket_path);
  std::string why;
  auto latest = c.LatestComplete(&why);
  ASSERT_TRUE(latest.ok()) << latest.status().ToString();
  EXPECT_FALSE(latest->has_value());
  EXPECT_NE(why.find("no complete snapshot"), std::string::npos) << why;
  ASSERT_TRUE(c.Register(0, kBytes).ok());
  auto r = c.Restore(0);
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound) << r.status().ToString();
  // Bad requests get errors, not a dead agent.
  EXPECT_FALSE(c.WriteVersion(5, 1, Shard(0, 1)).ok());
  EXPECT_TRUE(c.Shutdown().ok());
}

TEST(Agent, SilentRanksAreReportedDead) {
  Agents agents;
  AgentOptions o{.socket_path = SocketPath("hb"), .heartbeat_timeout_s = 0.3};
  agents.Start(o);
  AgentClient c = MustConnect(o.socket_path);
  ASSERT_TRUE(c.Register(0, 100).ok());
  ASSERT_TRUE(c.Register(1, 100).ok());
  auto dead = c.DeadRanks();
  ASSERT_TRUE(dead.ok());
  EXPECT_TRUE(dead->empty());
  for (int i = 0; i < 4; ++i) {  // rank 0 keeps beating, rank 1 is silent
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    ASSERT_TRUE(c.Heartbeat(0).ok());
  }
  dead = c.DeadRanks();
  ASSERT_TRUE(dead.ok());
  EXPECT_EQ(*dead, std::vector<int>{1});
  EXPECT_TRUE(c.Shutdown().ok());
}

TEST(Agent, ThreeAgentsRebuildAKilledNodeFromParity) { LoseNodesAndRebuild(2, 1, {1}); }

// A peer that is gone while a version is being published: the version is not published, the
// trainer gets an error that names the peer, and the previous version stays restorable.
TEST(Agent, VersionIsNotPublishedWhenAPeerMissesItsFragment) {
  const int base = 20000 + static_cast<int>(getpid() * 7 % 30000) + 50;
  std::vector<std::string> group;
  for (int i = 0; i < 3; ++i) group.push_back(StrCat("127.0.0.1:", base + i));
  auto options = [&](int node) {
    return AgentOptions{.socket_path = SocketPath("peerdown", node), .node = node,
                        .group = group, .k = 2, .m = 1, .peer_timeout_s = 1};
  };
  Agents agents;
  std::vector<pid_t> pids;
  for (int node = 0; node < 3; ++node) pids.push_back(agents.Start(options(node)));
  for (int node = 1; node < 3; ++node) MustConnect(options(node).socket_path);  // all are up
  AgentClient c = MustConnect(options(0).socket_path);
  ASSERT_TRUE(c.Register(0, kBytes).ok());
  ASSERT_TRUE(c.Register(1, kBytes).ok());
  WriteBoth(c, 0, 1, 1);
  agents.Kill(pids[2]);
  ASSERT_TRUE(c.WriteVersion(0, 2, Shard(0, 2)).ok());
  auto last = c.WriteVersion(1, 2, Shard(1, 2));
  ASSERT_FALSE(last.ok()) << "published without node 2's fragment";
  EXPECT_NE(last.status().message().find("node 2"), std::string::npos) << last.status().ToString();
  auto latest = c.LatestComplete();
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, std::optional<uint64_t>(1));
  ExpectRestores(c, 0, 1);
  ExpectRestores(c, 1, 1);
  EXPECT_TRUE(c.Shutdown().ok());
}

}  // namespace
}  // namespace tandem::checkpoint
