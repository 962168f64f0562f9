// Double-buffered snapshot memory in POSIX shared memory, owned by a node's snapshot agent.
//
// Each trainer rank of the node gets one region (shm object "/<prefix>-r<rank>") holding a
// RegionHeader and two version slots of `capacity_bytes` each (layout in docs/formats.md). The
// protocol for version V of rank r:
//   1. agent: BeginVersion(r, V) picks the slot that does NOT hold the newest complete version and
//      marks it kWriting (the newest complete version is never overwritten);
//   2. trainer: writes its shard into that slot through a ShardMapping (same shm, mapped by name);
//   3. agent: CommitVersion(r, V, bytes, crc) checks size and CRC-32 against the slot and marks it
//      kCommitted;
//   4. agent: once AllCommitted(V) (every registered rank) and any parity is done, Publish(V).
// A trainer that dies during 2 leaves its slot kWriting: V is never published and the previous
// complete version stays intact in the other slot. The regions live as long as the agent's
// SnapshotStore: a trainer's death loses nothing; the agent's death loses everything (by design;
// the other nodes' parity covers that, see agent.h).
//
// Ownership: SnapshotStore owns the shm objects and unlinks them in its destructor (and unlinks
// stale ones with its prefix at Create). ShardMapping is a trainer's move-only view of one region.
// Thread-safety: SnapshotStore methods are serialized by an internal mutex; the bytes of a
// kWriting slot belong to the trainer writing them until it asks for the commit.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/status.h"

namespace tandem::checkpoint {

enum class SlotState : uint32_t { kEmpty = 0, kWriting = 1, kCommitted = 2 };
const char* SlotStateName(SlotState s);

struct SlotHeader {
  uint64_t version;    // snapshot version in this slot (0 when empty)
  uint64_t num_bytes;  // bytes of the shard (<= capacity)
  uint32_t crc32;      // CRC-32 of those bytes, set at commit
  uint32_t state;      // SlotState
  uint8_t reserved[40];
};
static_assert(sizeof(SlotHeader) == 64);

struct RegionHeader {
  uint32_t magic;           // kRegionMagic
  uint32_t format_version;  // 1
  uint32_t rank;
  uint32_t reserved0;
  uint64_t capacity_bytes;  // per slot
  uint64_t data_offset[2];  // byte offset of each slot's data from the region start
  uint8_t reserved[24];
  SlotHeader slots[2];
};
static_assert(sizeof(RegionHeader) == 192);
inline constexpr uint32_t kRegionMagic = 0x52534e54;  // "TNSR"

// A mapped shm object (move-only; unmaps in the destructor, never unlinks).
class ShmMapping {
 public:
  ShmMapping() = default;
  ~ShmMapping();
  ShmMapping(ShmMapping&& o) noexcept;
  ShmMapping& operator=(ShmMapping&& o) noexcept;
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;

  // Creates (O_EXCL, after unlinking any stale object of that name) and maps `num_bytes`.
  static StatusOr<ShmMapping> Create(const std::string& name, size_t num_bytes);
  // Maps an existing object read-write.
  static StatusOr<ShmMapping> Open(const std::string& name);

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A trainer's view of its rank's region.
class ShardMapping {
 public:
  static StatusOr<ShardMapping> Open(const std::string& shm_name);
  uint64_t capacity_bytes() const { return header()->capacity_bytes; }
  int rank() const { return static_cast<int>(header()->rank); }
  // The slot's bytes: [capacity_bytes].
  uint8_t* slot_data(int slot) const;
  const SlotHeader& slot_header(int slot) const { return header()->slots[slot]; }

 private:
  const RegionHeader* header() const {
    return reinterpret_cast<const RegionHeader*>(map_.data());
  }
  ShmMapping map_;
};

struct SlotView {
  int slot;
  uint64_t version;
  const uint8_t* data;  // [num_bytes], valid while the store lives and the slot is not rewritten
  uint64_t num_bytes;
  uint32_t crc32;
};

class SnapshotStore {
 public:
  // `prefix`: shm name prefix without the leading '/', e.g. "tandem-1000-n0-1a2b". Stale objects
  // named "<prefix>-r*" (from an agent that died) are unlinked.
  static StatusOr<std::unique_ptr<SnapshotStore>> Create(const std::string& prefix);
  ~SnapshotStore();

  // Creates the region of `rank` with `capacity_bytes` per slot and returns its shm name
  // ("/<prefix>-r<rank>"). Registering a rank again with the same capacity keeps its data; with a
  // different capacity it is an error once a version is complete (InvalidArgument).
  StatusOr<std::string> RegisterRank(int rank, uint64_t capacity_bytes);
  std::vector<int> ranks() const;
  std::string ShmName(int rank) const;

  // Marks the slot `rank` writes `version` into and returns its index. FailedPrecondition when
  // version <= the newest complete version or the rank is unknown.
  StatusOr<int> BeginVersion(int rank, uint64_t version);
  // Checks that rank's slot holds `version` being written, num_bytes <= capacity and the CRC-32
  // of the bytes; marks it committed. DataLoss on a CRC mismatch (the slot stays unpublished).
  Status CommitVersion(int rank, uint64_t version, uint64_t num_bytes, uint32_t crc32);
  // True when every registered rank (at least one) has committed `version`.
  bool AllCommitted(uint64_t version) const;
  // Makes `version` the newest complete version. FailedPrecondition unless AllCommitted.
  Status Publish(uint64_t version);
  std::optional<uint64_t> latest_complete() const;

  // Rank's committed copy of `version`; NotFound when it has none.
  StatusOr<SlotView> Find(int rank, uint64_t version) const;
  // Stores a whole committed shard (used when rebuilding a node from its peers' fragments); the
  // rank must be registered with enough capacity.
  Status PutCommitted(int rank, uint64_t version, std::span<const uint8_t> bytes);

 private:
  explicit SnapshotStore(std::string prefix) : prefix_(std::move(prefix)) {}
  RegionHeader* Region(int rank) const;
  StatusOr<int> BeginLocked(int rank, uint64_t version);
  Status CommitLocked(int rank, uint64_t version, uint64_t num_bytes, uint32_t crc32);

  std::string prefix_;
  mutable std::mutex mu_;
  std::map<int, ShmMapping> regions_;
  std::optional<uint64_t> latest_complete_;
};

}  // namespace tandem::checkpoint
