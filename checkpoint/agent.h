// The per-node snapshot agent (`tandem agent`) and the client trainers use to talk to it.
//
// The agent is a long-lived process per node. It owns the node's snapshot memory (a
// SnapshotStore in POSIX shared memory), so a trainer that crashes loses nothing. Trainers talk
// to it over a Unix socket (control, one text line per request and reply; see
// docs/operations.md) and write their shards straight into the shared memory. With a group of
// k+m agents (one per node), each agent erasure-codes its node's newest complete version into k+m
// fragments and sends fragment j to node (node + j) % (k+m) over libfabric before publishing the
// version; an agent that restarted empty (its node was lost) rebuilds the node's snapshot from
// any k fragments held by the others (REBUILD). Agents with no group run alone (no parity).
//
// Requests (reply "OK ..." or "NONE <why>" or "ERR <CODE> <message>"):
//   REGISTER r bytes        -> OK <shm name>         (rank r's region, bytes per slot)
//   BEGIN r v               -> OK <slot>             (write version v of rank r into that slot)
//   COMMIT r v bytes crc    -> OK complete|pending   (complete: every rank committed v, parity
//                                                     sent and acknowledged, v published)
//   LATEST                  -> OK <v> | NONE <why>
//   RESTORE r [v]           -> OK <v> <slot> <bytes> <crc> <shm name> | NONE <why>
//                              (the newest complete version, or complete version v while its
//                              slot still holds it: the previous one survives until the next
//                              is published, so ranks of nodes one version apart agree)
//   HEARTBEAT r             -> OK
//   DEAD                    -> OK <r,r,...|->        (ranks silent for heartbeat_timeout_s)
//   REBUILD                 -> OK <v> | ERR ...      (fetch fragments from peers, rebuild)
//   SHUTDOWN                -> OK                    (the agent exits, unlinking its memory)
//   TEST_CORRUPT owner [v]  -> OK <v:i,...> | NONE   (test hook, only with test_hooks: flips a
//                                                     payload byte of the fragments this agent
//                                                     holds of node `owner`; v:i = version and
//                                                     fragment index hit)
//
// Thread-safety: RunAgent serves one request at a time; AgentClient is not thread-safe (one per
// trainer thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "checkpoint/internal/agent_socket.h"
#include "checkpoint/snapshot_store.h"
#include "core/status.h"

namespace tandem::checkpoint {

struct AgentOptions {
  std::string socket_path;                 // Unix socket trainers connect to
  int node = 0;                            // this node's index in `group`
  std::vector<std::string> group;          // "host:port" of every agent (k+m); empty: no peers
  int k = 0;                               // data fragments; 0: group size - m
  int m = 1;                               // parity fragments (1 uses XOR)
  std::string provider = "tcp";            // libfabric provider between agents
  double rate_limit_bytes_per_s = 0;       // pace of parity traffic; 0 = unlimited
  double peer_timeout_s = 30;              // every wait on a peer
  double heartbeat_timeout_s = 10;         // a rank silent this long is reported by DEAD
  std::string shm_prefix;                  // shm names; "" derives "tandem-<uid>-n<node>-<hash>"
  bool test_hooks = false;                 // serve TEST_CORRUPT (fault tests only, never in jobs)
};

// Runs the agent until SHUTDOWN, or until *stop becomes true (checked every 100 ms). Returns
// errors of setup (socket, fabric); request errors go to the requester.
Status RunAgent(const AgentOptions& options, const std::atomic<bool>* stop = nullptr);

struct RestoredShard {
  uint64_t version = 0;
  std::vector<uint8_t> bytes;
};

// A rank's bytes of one version where they lie, in the agent's shared memory (no copy). `bytes`
// stays valid while this object lives and the rank begins no newer version (a rank is the only
// writer of its own slots, so a restoring trainer cannot race with a writer).
struct MappedShard {
  uint64_t version = 0;
  std::span<const uint8_t> bytes;
  ShardMapping mapping;  // keeps the region mapped
};

// A trainer's connection to its node's agent.
class AgentClient {
 public:
  // Waits up to timeout_s for the agent's socket.
  static StatusOr<AgentClient> Connect(const std::string& socket_path, double timeout_s = 10);

  // Registers `rank` with `capacity_bytes` per slot and maps its region.
  Status Register(int rank, uint64_t capacity_bytes);
  // Starts version `version` of `rank`: returns where to write its bytes (capacity_bytes long).
  StatusOr<uint8_t*> BeginVersion(int rank, uint64_t version);
  // Commits `num_bytes` written at BeginVersion's pointer, whose CRC-32 (Crc32) the caller
  // computed where they landed (e.g. piece by piece as they landed); the agent checks it against
  // the slot. True when the version is complete.
  StatusOr<bool> CommitVersion(int rank, uint64_t version, uint64_t num_bytes, uint32_t crc32);
  // BeginVersion + copy + CommitVersion.
  StatusOr<bool> WriteVersion(int rank, uint64_t version, std::span<const uint8_t> bytes);

  // The newest complete version, or nullopt with `why` set when the agent holds none.
  StatusOr<std::optional<uint64_t>> LatestComplete(std::string* why = nullptr);
  // Rank's copy of the newest complete version (checked against its CRC). NotFound with the
  // agent's reason when there is no snapshot.
  StatusOr<RestoredShard> Restore(int rank);
  // Version `version` (complete, not newer than the newest complete one) if still held.
  StatusOr<RestoredShard> Restore(int rank, uint64_t version);
  // The same check, without the copy: what a restoring trainer uses for large states.
  StatusOr<MappedShard> RestoreMapped(int rank, uint64_t version);
  Status Heartbeat(int rank);
  StatusOr<std::vector<int>> DeadRanks();
  // Asks the agent to rebuild its node's snapshot from its peers; returns the version rebuilt.
  StatusOr<uint64_t> Rebuild();
  Status Shutdown();
  // Test hook (agent started with test_hooks): corrupts the fragments the agent holds of node
  // `owner` (only version `version` when given) in place; returns "v:i,..." (version:fragment).
  StatusOr<std::string> CorruptHeldFragmentsForTest(int owner,
                                                    std::optional<uint64_t> version = {});

  double timeout_s = 60;  // every request's reply deadline (REBUILD and COMMIT wait on peers)

 private:
  explicit AgentClient(internal::LineConn conn) : conn_(std::move(conn)) {}
  // Sends one request; returns the reply's words after "OK". NONE replies become NotFound.
  StatusOr<std::vector<std::string>> Call(const std::string& request);
  StatusOr<ShardMapping*> Mapping(int rank);

  internal::LineConn conn_;
  std::map<int, ShardMapping> maps_;
  std::map<int, std::string> shm_names_;
};

}  // namespace tandem::checkpoint
