// AgentSet: starting, checking, repairing and stopping the job's snapshot agents.
#include "launch/internal/agents.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>

#include "checkpoint/agent.h"
#include "launch/internal/process.h"

namespace tandem::launch::internal {
namespace {

using nlohmann::json;

// `n` distinct free TCP ports on 127.0.0.1 (bound together, then released for the agents).
StatusOr<std::vector<int>> FreeLoopbackPorts(int n) {
  std::vector<int> fds, ports;
  Status status;
  for (int i = 0; i < n && status.ok(); ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      status = UnavailableError(StrCat("no free loopback port for agent ", i));
    } else {
      ports.push_back(ntohs(addr.sin_port));
    }
    if (fd >= 0) fds.push_back(fd);
  }
  for (int fd : fds) close(fd);
  if (!status.ok()) return status;
  return ports;
}

// The IPv4 address of `host` (agents' libfabric addresses are "a.b.c.d:port"), or `host`.
std::string Ipv4Of(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) != 0 || !found) return host;
  char text[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(found->ai_addr)->sin_addr, text, sizeof(text));
  freeaddrinfo(found);
  return text;
}

}  // namespace

AgentSet::AgentSet(const SupervisorOptions& o, EventLog* log)
    : o_(o), log_(log), local_(SingleHost(o)) {
  for (int n = 0; n < NumNodes(o); ++n) {
    Node a;
    a.node = n;
    a.host = local_ ? "127.0.0.1" : o.hosts[n];
    a.port = o.agent_port + n;
    a.socket = StrCat(o.run_dir, "/agents/node", n, ".sock");
    a.log = StrCat(o.run_dir, "/logs/agent-node", n, ".log");
    nodes_.push_back(a);
  }
}

AgentSet::~AgentSet() {
  std::vector<pid_t> running;
  for (const Node& a : nodes_) {
    if (a.pid > 0) running.push_back(a.pid);
  }
  if (!running.empty()) KillSessions(running, 1.0, nullptr);
}

bool AgentSet::grouped() const { return nodes_.size() > 1 && o_.m > 0; }

std::vector<std::string> AgentSet::Argv(const Node& a) const {
  std::vector<std::string> argv;
  if (!local_) {
    argv = {o_.mpirun, "-np", "1", "--host", a.host};
    if (geteuid() == 0) argv.push_back("--allow-run-as-root");
    argv.insert(argv.end(), o_.mpirun_args.begin(), o_.mpirun_args.end());
  }
  argv.insert(argv.end(),
              {o_.agent_binary, "agent", "--socket", a.socket, "--node", std::to_string(a.node),
               "--peer-timeout", std::to_string(o_.agent_timeout_s)});
  if (grouped()) {
    std::string group;
    for (const Node& b : nodes_) {
      group += StrCat(group.empty() ? "" : ",", local_ ? b.host : Ipv4Of(b.host), ":", b.port);
    }
    const int k = o_.k > 0 ? o_.k : static_cast<int>(nodes_.size()) - o_.m;
    argv.insert(argv.end(),
                {"--group", group, "--k", std::to_string(k), "--m", std::to_string(o_.m)});
  }
  return argv;
}

Status AgentSet::StartAll() {
  std::error_code ec;
  std::filesystem::create_directories(StrCat(o_.run_dir, "/agents"), ec);
  if (local_ && grouped()) {
    TANDEM_ASSIGN_OR_RETURN(std::vector<int> ports, FreeLoopbackPorts(nodes_.size()));
    for (size_t n = 0; n < nodes_.size(); ++n) nodes_[n].port = ports[n];
  }
  for (Node& a : nodes_) TANDEM_RETURN_IF_ERROR(Start(a, /*restart=*/false));
  return Status::Ok();
}

Status AgentSet::Start(Node& a, bool restart) {
  std::error_code ec;
  std::filesystem::remove(a.socket, ec);  // a dead agent's socket
  TANDEM_ASSIGN_OR_RETURN(a.pid, SpawnInSession(Argv(a), {}, a.log));
  Status ready = WaitReady(a);
  if (!ready.ok()) {
    return ready.WithContext(StrCat("agent of node ", a.node, " (log ", a.log, ")"));
  }
  log_->Emit(restart ? "agent_restart" : "agent_start",
             {{"node", a.node},
              {"pid", a.pid},
              {"socket", a.socket},
              {"address", StrCat(a.host, ":", a.port)},
              {"log", a.log}},
             StrCat(restart ? "restarted" : "started", " the agent of node ", a.node, " (pid ",
                    a.pid, ", ", a.socket, ")"));
  return Status::Ok();
}

StatusOr<std::string> AgentSet::Request(const Node& a, const std::string& verb, double timeout_s) {
  if (local_) {
    TANDEM_ASSIGN_OR_RETURN(checkpoint::AgentClient client,
                            checkpoint::AgentClient::Connect(a.socket, std::min(timeout_s, 2.0)));
    client.timeout_s = timeout_s;
    if (verb == "REBUILD") {
      TANDEM_ASSIGN_OR_RETURN(uint64_t v, client.Rebuild());
      return StrCat("OK ", v);
    }
    if (verb == "SHUTDOWN") {
      TANDEM_RETURN_IF_ERROR(client.Shutdown());
      return std::string("OK");
    }
    std::string why;
    TANDEM_ASSIGN_OR_RETURN(std::optional<uint64_t> v, client.LatestComplete(&why));
    return v ? StrCat("OK ", *v) : StrCat("NONE ", why);
  }
  // Remote: `tandem run --agent-request` on the agent's host, through mpirun; its one-line answer
  // is the last line it appends to the node's request log.
  const std::string out = StrCat(o_.run_dir, "/logs/agent-node", a.node, "-requests.log");
  std::error_code ec;
  const auto offset = std::filesystem::exists(out) ? std::filesystem::file_size(out, ec) : 0;
  std::vector<std::string> argv = {o_.mpirun, "-np", "1", "--host", a.host};
  if (geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.insert(argv.end(), o_.mpirun_args.begin(), o_.mpirun_args.end());
  argv.insert(argv.end(), {o_.agent_binary, "run", "--agent-request", a.socket, verb,
                           std::to_string(timeout_s)});
  TANDEM_ASSIGN_OR_RETURN(pid_t pid, SpawnInSession(argv, {}, out));
  const double deadline = MonotonicSeconds() + timeout_s + 15;  // + mpirun's own start
  ExitInfo info;
  bool ended = false;
  while (!(ended = TryWait(pid, &info)) && MonotonicSeconds() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!ended) KillSessions({pid}, 1.0, nullptr);
  std::ifstream in(out);
  in.seekg(static_cast<std::streamoff>(offset));
  std::string line, answer;
  while (std::getline(in, line)) {
    if (line.rfind("OK", 0) == 0 || line.rfind("NONE", 0) == 0 || line.rfind("ERR", 0) == 0) {
      answer = line;
    }
  }
  if (ended && info.success() && !answer.empty()) return answer;
  return UnavailableError(StrCat(verb, " through mpirun on ", a.host, ": ",
                                 answer.empty() ? (ended ? info.ToString() : "timed out") : answer,
                                 " (", out, ")"));
}

Status AgentSet::WaitReady(Node& a) {
  const double deadline = MonotonicSeconds() + o_.agent_timeout_s;
  ExitInfo info;
  while (true) {
    if (TryWait(a.pid, &info)) {
      a.pid = -1;
      return UnavailableError(StrCat("the agent exited while starting (", info.ToString(), ")"));
    }
    StatusOr<std::string> answer = Request(a, "LATEST", local_ ? 2 : 5);
    if (answer.ok()) return Status::Ok();
    if (MonotonicSeconds() > deadline) {
      return DeadlineExceededError(StrCat("the agent did not answer on ", a.socket, " within ",
                                          o_.agent_timeout_s, " s: ", answer.status().message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

bool AgentSet::Alive(Node& a, std::string* why) {
  ExitInfo info;
  if (a.pid <= 0) {
    *why = "not running";
    return false;
  }
  if (TryWait(a.pid, &info)) {
    a.pid = -1;
    *why = StrCat("exited (", info.ToString(), ")");
    return false;
  }
  StatusOr<std::string> answer = Request(a, "LATEST", 5);
  if (answer.ok()) return true;
  *why = StrCat("does not answer on ", a.socket, ": ", answer.status().message());
  KillSessions({a.pid}, 1.0, nullptr);  // hung or stopped: replace it
  a.pid = -1;
  return false;
}

Status AgentSet::CheckAndRepair() {
  std::vector<Node*> lost;
  for (Node& a : nodes_) {
    std::string why;
    if (Alive(a, &why)) continue;
    lost.push_back(&a);
    log_->Emit("agent_lost", {{"node", a.node}, {"reason", why}},
               StrCat("the agent of node ", a.node, " is lost: ", why));
  }
  if (lost.empty()) {
    log_->Emit("agents_ok", {{"nodes", nodes_.size()}},
               StrCat("all ", nodes_.size(), " agents are alive and answering"));
    return Status::Ok();
  }
  for (Node* a : lost) TANDEM_RETURN_IF_ERROR(Start(*a, /*restart=*/true));
  const int num_lost = static_cast<int>(lost.size());
  if (!grouped() || num_lost > o_.m) {
    const std::string why =
        grouped() ? StrCat(num_lost, " agents lost, more than m = ", o_.m, " parity fragments")
                  : "agents run alone (no parity across nodes)";
    json nodes = json::array();
    for (Node* a : lost) nodes.push_back(a->node);
    log_->Emit("snapshot_lost", {{"nodes", nodes}, {"m", o_.m}, {"reason", why}},
               StrCat("in-memory snapshots of nodes ", nodes.dump(), " are gone (", why,
                      "): the job resumes from the newest universal checkpoint under "
                      "train.out_dir, or from the start when there is none"));
    return Status::Ok();
  }
  for (Node* a : lost) Rebuild(*a);
  return Status::Ok();
}

void AgentSet::Rebuild(Node& a) {
  StatusOr<std::string> answer = Request(a, "REBUILD", o_.agent_timeout_s);
  if (answer.ok()) {
    const std::string version = answer->substr(std::min<size_t>(3, answer->size()));
    log_->Emit("agent_rebuild", {{"node", a.node}, {"ok", true}, {"version", std::stoull(version)}},
               StrCat("the agent of node ", a.node, " rebuilt snapshot version ", version,
                      " from its peers' parity"));
  } else {
    log_->Emit("agent_rebuild",
               {{"node", a.node}, {"ok", false}, {"error", answer.status().message()}},
               StrCat("REBUILD on node ", a.node, " failed (", answer.status().message(),
                      "): that node resumes from an older source"));
  }
}

void AgentSet::ShutdownAll() {
  for (Node& a : nodes_) {
    if (a.pid <= 0) continue;
    const bool asked = Request(a, "SHUTDOWN", 5).ok();
    ExitInfo info;
    bool exited = false;
    const double deadline = MonotonicSeconds() + (asked ? o_.agent_timeout_s : 0);
    while (!(exited = TryWait(a.pid, &info)) && MonotonicSeconds() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!exited) {
      std::vector<ExitInfo> infos;
      KillSessions({a.pid}, o_.kill_grace_s, &infos);
      info = infos[0];
    }
    log_->Emit(
        "agent_stop",
        {{"node", a.node}, {"pid", a.pid}, {"shutdown_sent", asked}, {"exit", info.ToString()}},
        StrCat("stopped the agent of node ", a.node, " (", asked ? "SHUTDOWN" : "SIGTERM", ", ",
               info.ToString(), ")"));
    a.pid = -1;
  }
}

}  // namespace tandem::launch::internal
