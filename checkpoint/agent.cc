// The snapshot agent's server: a poll loop over the Unix socket and one handler per request.
#include "checkpoint/agent.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <sstream>

#include "checkpoint/internal/agent_image.h"
#include "checkpoint/internal/agent_peers.h"
#include "core/logging.h"

namespace tandem::checkpoint {
namespace {

using Clock = std::chrono::steady_clock;
using Words = std::vector<std::string>;

std::string ErrReply(const Status& s) { return StrCat("ERR ", StatusCodeName(s.code()), " ", s.message()); }

class Agent {
 public:
  Agent(const AgentOptions& o, std::unique_ptr<SnapshotStore> store,
        std::unique_ptr<internal::PeerGroup> peers)
      : options_(o), store_(std::move(store)), peers_(std::move(peers)) {}

  // One request line -> one reply line. Sets *shutdown on SHUTDOWN.
  std::string Handle(const std::string& line, bool* shutdown);

 private:
  StatusOr<std::string> Dispatch(const Words& w, bool* shutdown);
  StatusOr<std::string> Commit(int rank, uint64_t version, uint64_t bytes, uint32_t crc);
  StatusOr<std::string> Restore(int rank, std::optional<uint64_t> version);
  StatusOr<std::string> Rebuild();
  StatusOr<std::string> CorruptForTest(int owner, std::optional<uint64_t> version);
  Status InstallRebuilt(uint64_t version, const std::vector<uint8_t>& image);
  std::string NoSnapshot() const {
    return StrCat("NONE no complete snapshot on node ", options_.node,
                  " (an agent's memory starts empty when it starts; no version has completed",
                  " since)");
  }

  AgentOptions options_;
  std::unique_ptr<SnapshotStore> store_;
  std::unique_ptr<internal::PeerGroup> peers_;
  std::map<int, Clock::time_point> last_seen_;
};

std::string Agent::Handle(const std::string& line, bool* shutdown) {
  std::istringstream in(line);
  Words w;
  for (std::string s; in >> s;) w.push_back(s);
  if (w.empty()) return "ERR INVALID_ARGUMENT empty request";
  try {
    StatusOr<std::string> r = Dispatch(w, shutdown);
    return r.ok() ? *r : ErrReply(r.status());
  } catch (const std::exception&) {  // std::stoull on a malformed number
    return StrCat("ERR INVALID_ARGUMENT malformed request '", line, "'");
  }
}

StatusOr<std::string> Agent::Dispatch(const Words& w, bool* shutdown) {
  const std::string& verb = w[0];
  auto need = [&](size_t n) -> Status {
    if (w.size() == n + 1) return Status::Ok();
    return InvalidArgumentError(StrCat(verb, " expects ", n, " arguments, found ", w.size() - 1));
  };
  if (w.size() >= 2 && verb != "DEAD" && verb != "LATEST" && verb != "TEST_CORRUPT") {
    last_seen_[std::stoi(w[1])] = Clock::now();  // any request from a rank is a sign of life
  }
  if (verb == "REGISTER") {
    TANDEM_RETURN_IF_ERROR(need(2));
    TANDEM_ASSIGN_OR_RETURN(std::string name, store_->RegisterRank(std::stoi(w[1]), std::stoull(w[2])));
    return "OK " + name;
  }
  if (verb == "BEGIN") {
    TANDEM_RETURN_IF_ERROR(need(2));
    TANDEM_ASSIGN_OR_RETURN(int slot, store_->BeginVersion(std::stoi(w[1]), std::stoull(w[2])));
    return StrCat("OK ", slot);
  }
  if (verb == "COMMIT") {
    TANDEM_RETURN_IF_ERROR(need(4));
    return Commit(std::stoi(w[1]), std::stoull(w[2]), std::stoull(w[3]),
                  static_cast<uint32_t>(std::stoul(w[4])));
  }
  if (verb == "LATEST") {
    std::optional<uint64_t> v = store_->latest_complete();
    return v ? StrCat("OK ", *v) : NoSnapshot();
  }
  if (verb == "RESTORE") {
    if (w.size() != 3) TANDEM_RETURN_IF_ERROR(need(1));
    return Restore(std::stoi(w[1]), w.size() > 2 ? std::optional<uint64_t>(std::stoull(w[2]))
                                                 : std::nullopt);
  }
  if (verb == "HEARTBEAT") {
    TANDEM_RETURN_IF_ERROR(need(1));
    return std::string("OK");
  }
  if (verb == "DEAD") {
    std::string dead;
    const auto limit = std::chrono::duration<double>(options_.heartbeat_timeout_s);
    for (const auto& [rank, t] : last_seen_) {
      if (Clock::now() - t <= limit) continue;
      if (!dead.empty()) dead += ',';
      dead += std::to_string(rank);
    }
    return "OK " + (dead.empty() ? std::string("-") : dead);
  }
  if (verb == "REBUILD") return Rebuild();
  if (verb == "TEST_CORRUPT") {
    if (w.size() != 3) TANDEM_RETURN_IF_ERROR(need(1));
    std::optional<uint64_t> version;
    if (w.size() > 2) version = std::stoull(w[2]);
    return CorruptForTest(std::stoi(w[1]), version);
  }
  if (verb == "SHUTDOWN") {
    *shutdown = true;
    return std::string("OK");
  }
  return InvalidArgumentError(StrCat("unknown request '", verb, "' (expected REGISTER, BEGIN, ",
                                     "COMMIT, LATEST, RESTORE, HEARTBEAT, DEAD, REBUILD, SHUTDOWN)"));
}

StatusOr<std::string> Agent::Commit(int rank, uint64_t version, uint64_t bytes, uint32_t crc) {
  TANDEM_RETURN_IF_ERROR(store_->CommitVersion(rank, version, bytes, crc));
  if (!store_->AllCommitted(version)) return std::string("OK pending");
  if (peers_) {  // publish only once the parity is on the other nodes
    TANDEM_ASSIGN_OR_RETURN(std::vector<uint8_t> image, internal::BuildNodeImage(*store_, version));
    TANDEM_RETURN_IF_ERROR(peers_->Distribute(version, image));
  }
  TANDEM_RETURN_IF_ERROR(store_->Publish(version));
  return std::string("OK complete");
}

StatusOr<std::string> Agent::Restore(int rank, std::optional<uint64_t> version) {
  std::optional<uint64_t> v = store_->latest_complete();
  if (!v) return NoSnapshot();
  if (version) {
    if (*version > *v) {
      return NotFoundError(StrCat("version ", *version, " is not complete (newest complete: ", *v, ")"));
    }
    v = version;
  }
  TANDEM_ASSIGN_OR_RETURN(SlotView view, store_->Find(rank, *v));
  uint32_t actual = Crc32(0, view.data, view.num_bytes);
  if (actual != view.crc32) {
    return DataLossError(StrCat("rank ", rank, " version ", *v, ": shared memory CRC-32 ", actual,
                                ", committed ", view.crc32, " (overwritten after commit)"));
  }
  return StrCat("OK ", *v, " ", view.slot, " ", view.num_bytes, " ", view.crc32, " ",
                store_->ShmName(rank));
}

// Installs one decoded node image as complete version `version`.
Status Agent::InstallRebuilt(uint64_t version, const std::vector<uint8_t>& image) {
  uint64_t image_version = 0;
  TANDEM_ASSIGN_OR_RETURN(auto shards, internal::ParseNodeImage(image, &image_version));
  if (image_version != version) {
    return DataLossError(
        StrCat("rebuilt image says version ", image_version, ", fragments ", version));
  }
  for (const auto& s : shards) {
    TANDEM_RETURN_IF_ERROR(store_->RegisterRank(s.rank, s.capacity_bytes).status());
    TANDEM_RETURN_IF_ERROR(store_->PutCommitted(s.rank, version, s.bytes));
  }
  TANDEM_RETURN_IF_ERROR(store_->Publish(version));
  TANDEM_LOG(INFO, "agent") << "node " << options_.node << ": rebuilt version " << version
                            << " of " << shards.size() << " ranks from peer fragments";
  return Status::Ok();
}

// Installs every version the peers' fragments decode (oldest first, into the two slots), not only
// the newest: the other nodes may not have published the newest yet, and a job restores the
// newest version every node holds.
StatusOr<std::string> Agent::Rebuild() {
  if (!peers_) return FailedPreconditionError("REBUILD needs a group of agents (--group)");
  TANDEM_ASSIGN_OR_RETURN(auto images, peers_->Rebuild());
  const uint64_t newest = images.back().first;
  if (store_->latest_complete() && *store_->latest_complete() >= newest) {
    return StrCat("OK ", *store_->latest_complete());  // nothing newer to restore
  }
  for (const auto& [version, image] : images) {
    if (store_->latest_complete() && *store_->latest_complete() >= version) continue;
    Status installed = InstallRebuilt(version, image);
    if (!installed.ok() && version == newest) return installed;
    if (!installed.ok()) {  // an older version only helps; the newest is what matters
      TANDEM_LOG(WARNING, "agent") << "node " << options_.node << ": rebuilt version " << version
                                   << " not installed: " << installed.message();
    }
  }
  return StrCat("OK ", newest);
}

// The TEST_CORRUPT hook: refused unless the agent was started for tests.
StatusOr<std::string> Agent::CorruptForTest(int owner, std::optional<uint64_t> version) {
  if (!options_.test_hooks) {
    return FailedPreconditionError(
        "TEST_CORRUPT is a test hook: start the agent with --test-hooks");
  }
  if (!peers_) return FailedPreconditionError("TEST_CORRUPT needs a group of agents (--group)");
  std::string hit;
  for (const auto& [v, index] : peers_->CorruptHeldFragmentsForTest(owner, version)) {
    hit += StrCat(hit.empty() ? "" : ",", v, ":", index);
  }
  if (hit.empty()) return StrCat("NONE node ", options_.node, " holds no fragment of node ", owner);
  TANDEM_LOG(WARNING, "agent") << "node " << options_.node << ": TEST_CORRUPT flipped a byte in "
                               << "fragments (version:index) " << hit << " of node " << owner;
  return "OK " + hit;
}

std::string DefaultPrefix(const AgentOptions& o) {
  return StrCat("tandem-", getuid(), "-n", o.node, "-",
                std::hash<std::string>()(o.socket_path) % 0xffffff);
}

// Serves requests until SHUTDOWN or *stop.
Status ServeLoop(Agent& agent, int listen_fd, const std::atomic<bool>* stop) {
  std::vector<internal::LineConn> clients;
  bool shutdown = false;
  while (!shutdown && !(stop && *stop)) {
    std::vector<pollfd> fds = {{listen_fd, POLLIN, 0}};
    for (auto& c : clients) fds.push_back({c.fd(), POLLIN, 0});
    if (poll(fds.data(), fds.size(), 100) < 0 && errno != EINTR) {
      return InternalError(StrCat("agent: poll: ", std::strerror(errno)));
    }
    if (fds[0].revents & POLLIN) {
      int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) clients.emplace_back(fd);
    }
    for (size_t i = 0; i < clients.size() && !shutdown; ++i) {
      if (!(fds.size() > i + 1 && fds[i + 1].revents)) continue;
      StatusOr<bool> got = clients[i].FillOnce();
      bool closed = !got.ok();
      while (!closed && !shutdown && clients[i].HasLine()) {
        std::string reply = agent.Handle(clients[i].TakeLine(), &shutdown);
        closed = !clients[i].WriteLine(reply, 10).ok();
      }
      if (closed) clients[i] = internal::LineConn();  // a trainer that went away: drop it
    }
    std::erase_if(clients, [](const internal::LineConn& c) { return c.fd() < 0; });
  }
  return Status::Ok();
}

}  // namespace

Status RunAgent(const AgentOptions& options, const std::atomic<bool>* stop) {
  AgentOptions o = options;
  if (o.shm_prefix.empty()) o.shm_prefix = DefaultPrefix(o);
  TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<SnapshotStore> store, SnapshotStore::Create(o.shm_prefix));
  std::unique_ptr<internal::PeerGroup> peers;
  if (!o.group.empty()) {
    internal::PeerGroupOptions po{o.node, o.group, o.k, o.m, o.provider, o.rate_limit_bytes_per_s,
                                  o.peer_timeout_s};
    TANDEM_ASSIGN_OR_RETURN(peers, internal::PeerGroup::Create(po));
  }
  TANDEM_ASSIGN_OR_RETURN(int listen_fd, internal::ListenUnix(o.socket_path));
  TANDEM_LOG(INFO, "agent") << "node " << o.node << " serving " << o.socket_path << " (shm "
                            << o.shm_prefix << ", " << (o.group.empty() ? 1 : o.group.size())
                            << " nodes)";
  Agent agent(o, std::move(store), std::move(peers));
  Status s = ServeLoop(agent, listen_fd, stop);
  close(listen_fd);
  unlink(o.socket_path.c_str());
  return s;
}

}  // namespace tandem::checkpoint
