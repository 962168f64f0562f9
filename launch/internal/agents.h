// The snapshot agents of a supervised job: one `tandem agent` per node, started before the first
// attempt, checked (and restarted, with REBUILD) after every failed attempt, shut down at the end.
// Agents are the supervisor's children in sessions of their own, never in the job's process
// tree, so they outlive trainer crashes and the job's teardown.
//
// On one host every agent runs here on 127.0.0.1 with free ports and is asked through its Unix
// socket (LATEST to check it, REBUILD, SHUTDOWN). On several hosts node n's agent is started by
// `mpirun -np 1 --host <host>` (port agent_port + n) and each request goes through another
// `mpirun -np 1 --host <host> tandem run --agent-request SOCKET VERB` (about a second each).
//
// Ownership: owns the agent processes. Thread-safety: one thread.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "core/status.h"
#include "launch/internal/event_log.h"
#include "launch/internal/supervisor.h"

namespace tandem::launch::internal {

class AgentSet {
 public:
  // `o` and `log` must outlive the set.
  AgentSet(const SupervisorOptions& o, EventLog* log);
  AgentSet(const AgentSet&) = delete;
  AgentSet& operator=(const AgentSet&) = delete;
  ~AgentSet();  // kills agents still running (ShutdownAll is the clean way)

  // Starts every node's agent and waits until each answers (local) or is running (remote).
  Status StartAll();
  // After a failed attempt: restarts every agent that died or stopped answering and asks it to
  // REBUILD its node's snapshot from its peers' parity (an error there is logged, not fatal);
  // with more agents lost than parity fragments, logs that the snapshot is gone. Errors only
  // when an agent cannot be started again.
  Status CheckAndRepair();
  // SHUTDOWN to each agent and a wait for it; agents that do not exit are killed.
  void ShutdownAll();

  // Pid of node n's agent process (-1 when not running); for tests and logs.
  pid_t pid(int node) const { return nodes_[node].pid; }
  std::string socket_path(int node) const { return nodes_[node].socket; }

 private:
  struct Node {
    int node = 0;
    std::string host;    // "127.0.0.1" on one host
    int port = 0;        // libfabric port between agents
    std::string socket;  // <run_dir>/agents/node<n>.sock
    std::string log;     // <run_dir>/logs/agent-node<n>.log
    pid_t pid = -1;
  };

  bool grouped() const;  // erasure-coded across nodes (more than one node and m > 0)
  std::vector<std::string> Argv(const Node& a) const;
  Status Start(Node& a, bool restart);
  // One request (LATEST, REBUILD or SHUTDOWN) to node a's agent: through its socket on this
  // host, or through `mpirun -np 1 --host <host> tandem run --agent-request` on another. Returns
  // the agent's answer ("OK ...", "NONE ...").
  StatusOr<std::string> Request(const Node& a, const std::string& verb, double timeout_s);
  Status WaitReady(Node& a);
  bool Alive(Node& a, std::string* why);
  void Rebuild(Node& a);

  const SupervisorOptions& o_;
  EventLog* log_;
  bool local_;
  std::vector<Node> nodes_;
};

}  // namespace tandem::launch::internal
