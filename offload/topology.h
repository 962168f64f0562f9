// NUMA topology and memory tiers: where each kind of training state lives, and host memory that
// honours the choice.
//
// Topology is read from /sys/devices/system/node (node<N>/cpulist, node<N>/meminfo) or from any
// directory laid out the same way (tests build a fake one). A node with memory and no CPUs is
// treated as CXL-attached memory (how CXL Type-3 expanders appear to Linux).
//
// PlacementPolicy maps each StateKind to a Tier with the measured rule: optimizer states and
// f32 master weights stay in local DRAM (they are read and written every step at full bandwidth);
// bf16 weights, gradients and activations may go to CXL, interleaved over every CXL node. A
// kind may be overridden to any tier. When no CXL node exists the CXL choice falls back to local
// DRAM and Placement::reason says so.
//
//   TANDEM_ASSIGN_OR_RETURN(Topology topo, Topology::ReadFromSysfs());
//   PlacementPolicy policy(topo, {});
//   Placement p = policy.Place(StateKind::kWeightsBf16);
//   TANDEM_ASSIGN_OR_RETURN(NumaBuffer buf, NumaBuffer::Allocate(bytes, p));
//
// Thread-safety: Topology and PlacementPolicy are values (const after construction);
// NumaBuffer is a move-only owner of its mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/allocator.h"
#include "core/status.h"

namespace tandem::offload {

struct NumaNode {
  int id = 0;
  std::vector<int> cpus;
  uint64_t mem_total_bytes = 0;
  bool is_cxl() const { return cpus.empty() && mem_total_bytes > 0; }  // memory, no CPUs
};

struct Topology {
  std::vector<NumaNode> nodes;  // sorted by id

  // Reads `root` (default the real sysfs). NotFound when it has no node<N> directory;
  // InvalidArgument (naming the file) for an unreadable cpulist or meminfo.
  static StatusOr<Topology> ReadFromSysfs(const std::string& root = "/sys/devices/system/node");
  std::vector<int> CpuNodes() const;  // nodes with CPUs
  std::vector<int> CxlNodes() const;  // nodes with memory and no CPUs
  // The node whose CPU list holds `cpu`, or -1.
  int NodeOfCpu(int cpu) const;
};

// Parses a Linux CPU list ("0-3,8,10-11"; empty -> none). InvalidArgument on malformed text.
StatusOr<std::vector<int>> ParseCpuList(std::string_view text);

enum class StateKind : uint8_t { kOptimizerState, kMaster, kWeightsBf16, kGrads, kActivations };
enum class Tier : uint8_t { kGpu, kDram, kCxl, kNvme };

const char* StateKindName(StateKind kind);  // "optimizer_state", "master", "weights_bf16", ...
const char* TierName(Tier tier);            // "gpu", "dram", "cxl", "nvme"
StatusOr<StateKind> ParseStateKind(std::string_view name);
StatusOr<Tier> ParseTier(std::string_view name);

struct Placement {
  Tier tier = Tier::kDram;
  std::vector<int> numa_nodes;  // dram: the local node; cxl: nodes to interleave over
  std::string reason;           // why (rule, override or fallback), for logs
};

struct PlacementOptions {
  std::map<StateKind, Tier> overrides;  // replaces the default rule for a kind
  int local_node = -1;                  // the DRAM node; -1: the first node with CPUs
};

class PlacementPolicy {
 public:
  PlacementPolicy(Topology topology, PlacementOptions options);
  Placement Place(StateKind kind) const;
  const Topology& topology() const { return topology_; }

 private:
  Topology topology_;
  PlacementOptions options_;
};

// The default rule on this machine's topology (ReadFromSysfs); where the topology cannot be read
// (no /sys/devices/system/node, e.g. in some containers) plain memory, reason saying why.
Placement PlaceOnThisMachine(StateKind kind);

// Host memory placed per a Placement: bound to the DRAM node, interleaved over the CXL nodes
// (libnuma; mbind semantics), plain page-aligned memory for gpu/nvme placements or where NUMA is
// unavailable. Pages are touched at allocation so they land where the policy says.
class NumaBuffer {
 public:
  NumaBuffer() = default;
  static StatusOr<NumaBuffer> Allocate(size_t num_bytes, const Placement& placement);
  ~NumaBuffer();
  NumaBuffer(NumaBuffer&& other) noexcept;
  NumaBuffer& operator=(NumaBuffer&& other) noexcept;
  NumaBuffer(const NumaBuffer&) = delete;
  NumaBuffer& operator=(const NumaBuffer&) = delete;

  void* data() const { return data_; }
  size_t num_bytes() const { return num_bytes_; }
  bool numa_placed() const { return numa_placed_; }  // false: plain memory (no libnuma policy)

 private:
  void Reset();
  void* data_ = nullptr;
  size_t num_bytes_ = 0;
  bool numa_placed_ = false;
};

// An Allocator of host memory placed per one Placement (each allocation a NumaBuffer: bound,
// interleaved or plain as above, zeroed on first touch), for buffers other modules allocate
// through the Allocator interface (the model's streamed layer weights). Thread-safe; every
// allocation must be returned before the allocator goes.
class PlacedHostAllocator : public Allocator {
 public:
  explicit PlacedHostAllocator(Placement placement) : placement_(std::move(placement)) {}
  ~PlacedHostAllocator() override;
  StatusOr<void*> Allocate(size_t num_bytes) override;
  void Deallocate(void* ptr, size_t num_bytes) override;
  Device device() const override { return Device::Cpu(); }
  AllocatorStats stats() const override;
  const Placement& placement() const { return placement_; }

 private:
  Placement placement_;
  mutable std::mutex mu_;
  std::map<void*, NumaBuffer> live_;
  AllocatorStats stats_;
};

}  // namespace tandem::offload
