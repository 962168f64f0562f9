// Helpers of the agent tests: forked agent processes (killed and cleaned up whatever happens),
// deterministic shards, and the k+m node-loss scenario shared by the fast and slow tests.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <thread>

#include "checkpoint/agent.h"

namespace tandem::checkpoint::testing_agent {

inline constexpr size_t kBytes = 300007;

inline std::vector<uint8_t> Shard(int rank, uint64_t version) {
  std::mt19937_64 gen(rank * 1000 + version);
  std::vector<uint8_t> v(kBytes - 13 * rank);
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

inline std::string Stem() { return StrCat("tandem-agent-test-", getpid()); }

inline std::string SocketPath(const char* what, int node = 0) {
  return StrCat("/tmp/", Stem(), "-", what, "-", node, ".sock");
}

// Agents killed by the guard leave their socket and shared memory: remove what this process made.
inline void RemoveLeftovers() {
  for (const char* dir : {"/tmp", "/dev/shm"}) {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      if (e.path().filename().string().rfind(Stem(), 0) == 0) std::filesystem::remove(e.path(), ec);
    }
  }
}

// Forked agent processes, killed at the end of the test whatever happens.
class Agents {
 public:
  ~Agents() {
    for (pid_t p : pids_) {
      if (p > 0) {
        kill(p, SIGKILL);
        waitpid(p, nullptr, 0);
      }
    }
    RemoveLeftovers();
  }
  pid_t Start(AgentOptions o) {
    o.shm_prefix = StrCat(Stem(), "-n", o.node, "-", std::hash<std::string>()(o.socket_path) % 1000);
    pid_t pid = fork();
    if (pid == 0) {
      Status s = RunAgent(o);
      if (!s.ok()) std::fprintf(stderr, "agent: %s\n", s.ToString().c_str());
      _exit(s.ok() ? 0 : 1);
    }
    pids_.push_back(pid);
    return pid;
  }
  void Kill(pid_t pid) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    std::erase(pids_, pid);
  }
  // Waits for a clean exit (after SHUTDOWN).
  int Wait(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
    std::erase(pids_, pid);
    return status;
  }

 private:
  std::vector<pid_t> pids_;
};

inline AgentClient MustConnect(const std::string& path) {
  auto c = AgentClient::Connect(path, 20);
  TANDEM_CHECK_OK(c.status());
  return std::move(*c);
}

inline void WriteBoth(AgentClient& c, int r0, int r1, uint64_t v) {
  auto a = c.WriteVersion(r0, v, Shard(r0, v));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  EXPECT_FALSE(*a) << "complete before rank " << r1 << " committed";
  auto b = c.WriteVersion(r1, v, Shard(r1, v));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_TRUE(*b) << "version " << v << " not complete after every rank committed";
}

inline void ExpectRestores(AgentClient& c, int rank, uint64_t version) {
  auto r = c.Restore(rank);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->version, version);
  EXPECT_TRUE(r->bytes == Shard(rank, version)) << "rank " << rank << " not bitwise equal";
}

// k + m agents on localhost (libfabric tcp); each node n holds ranks 2n and 2n+1. Versions 1 and 2
// complete everywhere; the agents of `lost` are killed (their memory is gone) and restarted empty;
// each rebuilds its node's version 2 bitwise from the survivors' fragments, then carries on.
inline void LoseNodesAndRebuild(int k, int m, const std::vector<int>& lost) {
  const int n = k + m;
  const int base = 20000 + static_cast<int>(getpid() * 7 % 30000) + 10 * m;
  std::vector<std::string> group;
  for (int i = 0; i < n; ++i) group.push_back(StrCat("127.0.0.1:", base + i));
  auto options = [&](int node) {
    return AgentOptions{.socket_path = SocketPath("ec", 10 * m + node), .node = node,
                        .group = group, .k = k, .m = m, .peer_timeout_s = 10};
  };
  Agents agents;
  std::vector<pid_t> pids;
  for (int node = 0; node < n; ++node) pids.push_back(agents.Start(options(node)));
  {
    std::vector<AgentClient> clients;
    for (int node = 0; node < n; ++node) {
      clients.push_back(MustConnect(options(node).socket_path));
      ASSERT_TRUE(clients[node].Register(2 * node, kBytes).ok());
      ASSERT_TRUE(clients[node].Register(2 * node + 1, kBytes).ok());
    }
    for (uint64_t v = 1; v <= 2; ++v) {
      for (int node = 0; node < n; ++node) WriteBoth(clients[node], 2 * node, 2 * node + 1, v);
    }
  }
  for (int node : lost) agents.Kill(pids[node]);  // the whole node: agent and its memory
  for (int node : lost) pids[node] = agents.Start(options(node));
  for (int node : lost) {
    SCOPED_TRACE(::testing::Message() << "k=" << k << " m=" << m << " rebuilding node " << node);
    AgentClient c = MustConnect(options(node).socket_path);
    auto latest = c.LatestComplete();
    ASSERT_TRUE(latest.ok());
    EXPECT_FALSE(latest->has_value());
    auto rebuilt = c.Rebuild();
    ASSERT_TRUE(rebuilt.ok()) << rebuilt.status().ToString();
    EXPECT_EQ(*rebuilt, 2u);
    ASSERT_TRUE(c.Register(2 * node, kBytes).ok());
    ASSERT_TRUE(c.Register(2 * node + 1, kBytes).ok());
    ExpectRestores(c, 2 * node, 2);
    ExpectRestores(c, 2 * node + 1, 2);
  }
  // The rebuilt nodes carry on: version 3 completes with parity on the other nodes again.
  for (int node : lost) {
    AgentClient c = MustConnect(options(node).socket_path);
    ASSERT_TRUE(c.Register(2 * node, kBytes).ok());
    ASSERT_TRUE(c.Register(2 * node + 1, kBytes).ok());
    WriteBoth(c, 2 * node, 2 * node + 1, 3);
  }
  for (int node = 0; node < n; ++node) {
    AgentClient s = MustConnect(options(node).socket_path);
    EXPECT_TRUE(s.Shutdown().ok());
  }
}

}  // namespace tandem::checkpoint::testing_agent
