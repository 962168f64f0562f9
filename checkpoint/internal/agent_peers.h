// The erasure-coding group of snapshot agents: k+m agents, one per node, connected over the
// libfabric Transport. Each distributes fragments of its node image and holds the others'.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "checkpoint/erasure.h"
#include "collectives/fabric.h"
#include "core/status.h"

namespace tandem::checkpoint::internal {

struct PeerGroupOptions {
  int node = 0;
  std::vector<std::string> group;  // "host:port" by node
  int k = 0;
  int m = 1;
  std::string provider = "tcp";
  double rate_limit_bytes_per_s = 0;
  double timeout_s = 30;
};

// Thread-safety: Distribute and Rebuild are called from one thread (the agent's); a receiver
// thread owned by the group answers peers.
class PeerGroup {
 public:
  static StatusOr<std::unique_ptr<PeerGroup>> Create(const PeerGroupOptions& options);
  ~PeerGroup();

  // Encodes `image` of `version` and sends fragment j to node (node + j) % n, j = 1..n-1; returns
  // once every one of them acknowledged a valid fragment.
  Status Distribute(uint64_t version, std::span<const uint8_t> image);
  // Asks every peer for the fragments it holds of this node (the two newest versions); decodes
  // every version of which at least k valid fragments came back: (version, image), oldest first.
  // DataLoss when none can be decoded.
  StatusOr<std::vector<std::pair<uint64_t, std::vector<uint8_t>>>> Rebuild();

  // Test hook (agents started with --test-hooks): flips one payload byte of every fragment this
  // node holds of `owner`'s snapshot (only version `version` when given), as a memory fault
  // would; the fragments keep their old CRCs. Returns the (version, fragment index) pairs hit.
  std::vector<std::pair<uint64_t, int>> CorruptHeldFragmentsForTest(
      int owner, std::optional<uint64_t> version);

 private:
  PeerGroup(const PeerGroupOptions& options, ErasureCoder coder)
      : options_(options), coder_(std::move(coder)) {}
  void ReceiveLoop();
  void Handle(collectives::FabricMessage msg);

  PeerGroupOptions options_;
  ErasureCoder coder_;
  std::unique_ptr<collectives::Transport> transport_;
  std::vector<int> handle_;  // transport peer handle by node (-1 for self)
  std::thread thread_;
  std::atomic<bool> stop_{false};

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint32_t, std::map<uint64_t, std::vector<uint8_t>>> held_;  // owner -> version -> frag
  std::map<std::pair<uint64_t, int>, bool> acks_;  // (version, node) -> fragment was valid
  uint64_t next_request_ = 1;
  std::map<uint64_t, std::map<int, std::vector<std::vector<uint8_t>>>> replies_;  // req -> node
};

}  // namespace tandem::checkpoint::internal
