// AgentClient: the trainer side of the agent protocol (see agent.h).
#include <cstring>
#include <sstream>

#include "checkpoint/agent.h"
#include "checkpoint/erasure.h"

namespace tandem::checkpoint {
namespace {

std::vector<std::string> Words(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::string> w;
  for (std::string s; in >> s;) w.push_back(s);
  return w;
}

StatusCode CodeFromName(const std::string& name) {
  for (int c = 0; c <= static_cast<int>(StatusCode::kInternal); ++c) {
    if (name == StatusCodeName(static_cast<StatusCode>(c))) return static_cast<StatusCode>(c);
  }
  return StatusCode::kInternal;
}

}  // namespace

StatusOr<AgentClient> AgentClient::Connect(const std::string& socket_path, double timeout_s) {
  TANDEM_ASSIGN_OR_RETURN(internal::LineConn conn, internal::ConnectUnix(socket_path, timeout_s));
  return AgentClient(std::move(conn));
}

StatusOr<std::vector<std::string>> AgentClient::Call(const std::string& request) {
  TANDEM_RETURN_IF_ERROR(conn_.WriteLine(request, timeout_s));
  TANDEM_ASSIGN_OR_RETURN(std::string reply, conn_.ReadLine(timeout_s));
  std::vector<std::string> w = Words(reply);
  const std::string verb = Words(request).at(0);
  if (!w.empty() && w[0] == "OK") return std::vector<std::string>(w.begin() + 1, w.end());
  if (!w.empty() && w[0] == "NONE") {
    return NotFoundError(StrCat("agent (", verb, "): ", reply.substr(5)));
  }
  if (w.size() >= 2 && w[0] == "ERR") {
    return Status(CodeFromName(w[1]),
                  StrCat("agent (", verb, "): ", reply.substr(std::min(reply.size(), 5 + w[1].size()))));
  }
  return InternalError(StrCat("agent (", verb, "): unexpected reply '", reply, "'"));
}

StatusOr<ShardMapping*> AgentClient::Mapping(int rank) {
  auto it = maps_.find(rank);
  if (it == maps_.end()) {
    return FailedPreconditionError(StrCat("agent client: rank ", rank, " is not registered"));
  }
  return &it->second;
}

Status AgentClient::Register(int rank, uint64_t capacity_bytes) {
  TANDEM_ASSIGN_OR_RETURN(auto w, Call(StrCat("REGISTER ", rank, " ", capacity_bytes)));
  if (w.size() != 1) return InternalError("agent: REGISTER reply without a shm name");
  TANDEM_ASSIGN_OR_RETURN(ShardMapping map, ShardMapping::Open(w[0]));
  maps_.erase(rank);
  maps_.emplace(rank, std::move(map));
  shm_names_[rank] = w[0];
  return Status::Ok();
}

StatusOr<uint8_t*> AgentClient::BeginVersion(int rank, uint64_t version) {
  TANDEM_ASSIGN_OR_RETURN(ShardMapping* map, Mapping(rank));
  TANDEM_ASSIGN_OR_RETURN(auto w, Call(StrCat("BEGIN ", rank, " ", version)));
  if (w.size() != 1 || (w[0] != "0" && w[0] != "1")) return InternalError("agent: bad BEGIN reply");
  return map->slot_data(std::stoi(w[0]));
}

StatusOr<bool> AgentClient::CommitVersion(int rank, uint64_t version, uint64_t num_bytes,
                                          uint32_t crc32) {
  TANDEM_ASSIGN_OR_RETURN(auto w, Call(StrCat("COMMIT ", rank, " ", version, " ", num_bytes, " ", crc32)));
  return !w.empty() && w[0] == "complete";
}

StatusOr<bool> AgentClient::WriteVersion(int rank, uint64_t version,
                                         std::span<const uint8_t> bytes) {
  TANDEM_ASSIGN_OR_RETURN(ShardMapping* map, Mapping(rank));
  if (bytes.size() > map->capacity_bytes()) {
    return InvalidArgumentError(StrCat("agent client: rank ", rank, " writes ", bytes.size(),
                                       " bytes, registered ", map->capacity_bytes()));
  }
  TANDEM_ASSIGN_OR_RETURN(uint8_t* dst, BeginVersion(rank, version));
  std::memcpy(dst, bytes.data(), bytes.size());
  // The CRC of the bytes where they landed (the agent recomputes it from the same memory).
  return CommitVersion(rank, version, bytes.size(), Crc32(0, dst, bytes.size()));
}

StatusOr<std::optional<uint64_t>> AgentClient::LatestComplete(std::string* why) {
  StatusOr<std::vector<std::string>> w = Call("LATEST");
  if (!w.ok() && w.status().code() == StatusCode::kNotFound) {
    if (why) *why = w.status().message();
    return std::optional<uint64_t>();
  }
  if (!w.ok()) return w.status();
  if (w->size() != 1) return InternalError("agent: bad LATEST reply");
  return std::optional<uint64_t>(std::stoull((*w)[0]));
}

StatusOr<RestoredShard> AgentClient::Restore(int rank) { return Restore(rank, UINT64_MAX); }

StatusOr<RestoredShard> AgentClient::Restore(int rank, uint64_t wanted) {
  TANDEM_ASSIGN_OR_RETURN(MappedShard m, RestoreMapped(rank, wanted));
  return RestoredShard{m.version, std::vector<uint8_t>(m.bytes.begin(), m.bytes.end())};
}

StatusOr<MappedShard> AgentClient::RestoreMapped(int rank, uint64_t wanted) {
  TANDEM_ASSIGN_OR_RETURN(
      auto w, Call(wanted == UINT64_MAX ? StrCat("RESTORE ", rank)
                                         : StrCat("RESTORE ", rank, " ", wanted)));
  if (w.size() != 5) return InternalError("agent: bad RESTORE reply");
  const uint64_t version = std::stoull(w[0]), num_bytes = std::stoull(w[2]);
  const int slot = std::stoi(w[1]);
  const uint32_t crc = static_cast<uint32_t>(std::stoul(w[3]));
  TANDEM_ASSIGN_OR_RETURN(ShardMapping map, ShardMapping::Open(w[4]));
  if (num_bytes > map.capacity_bytes() || (slot != 0 && slot != 1)) {
    return DataLossError(StrCat("agent: RESTORE of rank ", rank, " names ", num_bytes,
                                " bytes in slot ", slot, " of a ", map.capacity_bytes(),
                                "-byte region"));
  }
  const uint8_t* data = map.slot_data(slot);
  const uint32_t actual = Crc32(0, data, num_bytes);  // multi-threaded for large shards
  if (actual != crc) {
    return DataLossError(StrCat("agent: rank ", rank, " version ", version, " CRC-32 ", actual,
                                ", expected ", crc, " (the slot changed while restoring?)"));
  }
  return MappedShard{version, std::span<const uint8_t>(data, num_bytes), std::move(map)};
}

Status AgentClient::Heartbeat(int rank) { return Call(StrCat("HEARTBEAT ", rank)).status(); }

StatusOr<std::vector<int>> AgentClient::DeadRanks() {
  TANDEM_ASSIGN_OR_RETURN(auto w, Call("DEAD"));
  std::vector<int> dead;
  if (w.size() == 1 && w[0] != "-") {
    std::istringstream in(w[0]);
    for (std::string r; std::getline(in, r, ',');) dead.push_back(std::stoi(r));
  }
  return dead;
}

StatusOr<uint64_t> AgentClient::Rebuild() {
  TANDEM_ASSIGN_OR_RETURN(auto w, Call("REBUILD"));
  if (w.size() != 1) return InternalError("agent: bad REBUILD reply");
  return std::stoull(w[0]);
}

Status AgentClient::Shutdown() { return Call("SHUTDOWN").status(); }

StatusOr<std::string> AgentClient::CorruptHeldFragmentsForTest(int owner,
                                                                std::optional<uint64_t> version) {
  TANDEM_ASSIGN_OR_RETURN(auto w, Call(version ? StrCat("TEST_CORRUPT ", owner, " ", *version)
                                               : StrCat("TEST_CORRUPT ", owner)));
  if (w.size() != 1) return InternalError("agent: bad TEST_CORRUPT reply");
  return w[0];
}

}  // namespace tandem::checkpoint
