// A node's snapshot as one byte object (the "node image") for erasure coding: every rank's shard
// of one version with its size and CRC (layout in docs/formats.md).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "checkpoint/snapshot_store.h"
#include "core/status.h"

namespace tandem::checkpoint::internal {

struct ImageShard {
  int rank = 0;
  uint64_t capacity_bytes = 0;
  std::vector<uint8_t> bytes;
};

// Every registered rank's committed copy of `version`, serialized.
StatusOr<std::vector<uint8_t>> BuildNodeImage(const SnapshotStore& store, uint64_t version);
// Parses an image; checks magic and every shard's CRC. Sets *version.
StatusOr<std::vector<ImageShard>> ParseNodeImage(std::span<const uint8_t> image, uint64_t* version);

}  // namespace tandem::checkpoint::internal
