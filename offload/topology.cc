// NUMA topology from sysfs, the placement rule, and libnuma-placed host buffers.
#include "offload/topology.h"

#include <numa.h>
#include <sys/mman.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/logging.h"
#include "core/parallel.h"

namespace tandem::offload {

namespace fs = std::filesystem;

StatusOr<std::vector<int>> ParseCpuList(std::string_view text) {
  std::vector<int> cpus;
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string_view::npos) comma = text.size();
    const std::string_view item = text.substr(pos, comma - pos);
    const size_t dash = item.find('-');
    int lo = 0, hi = 0;
    auto parse = [](std::string_view s, int& out) {
      auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
      return ec == std::errc() && p == s.data() + s.size() && !s.empty();
    };
    const bool ok = dash == std::string_view::npos
                        ? parse(item, lo) && (hi = lo, true)
                        : parse(item.substr(0, dash), lo) && parse(item.substr(dash + 1), hi);
    if (!ok || hi < lo || lo < 0) {
      return InvalidArgumentError(StrCat("cpu list: expected \"a-b,c,...\", found \"", text,
                                         "\" (bad item \"", item, "\")"));
    }
    for (int c = lo; c <= hi; ++c) cpus.push_back(c);
    pos = comma + 1;
  }
  return cpus;
}

namespace {
StatusOr<std::string> ReadSmallFile(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return InvalidArgumentError(StrCat("cannot read ", path.string()));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// "Node 0 MemTotal:        8349900 kB" -> bytes.
StatusOr<uint64_t> ParseMemTotal(const std::string& meminfo, const std::string& where) {
  const size_t at = meminfo.find("MemTotal:");
  if (at == std::string::npos) {
    return InvalidArgumentError(StrCat(where, ": expected a \"MemTotal:\" line"));
  }
  std::istringstream line(meminfo.substr(at + 9));
  uint64_t kb = 0;
  std::string unit;
  if (!(line >> kb >> unit) || unit != "kB") {
    return InvalidArgumentError(StrCat(where, ": expected \"MemTotal: <n> kB\""));
  }
  return kb * 1024;
}
}  // namespace

StatusOr<Topology> Topology::ReadFromSysfs(const std::string& root) {
  Topology topo;
  std::error_code ec;
  fs::directory_iterator it(root, ec);
  if (ec) return NotFoundError(StrCat("NUMA topology: cannot list ", root, ": ", ec.message()));
  for (const fs::directory_entry& e : it) {
    const std::string name = e.path().filename().string();
    if (name.rfind("node", 0) != 0 || name.size() == 4 ||
        !std::all_of(name.begin() + 4, name.end(), ::isdigit) || !e.is_directory()) {
      continue;
    }
    NumaNode node;
    node.id = std::stoi(name.substr(4));
    TANDEM_ASSIGN_OR_RETURN(const std::string cpulist, ReadSmallFile(e.path() / "cpulist"));
    auto cpus = ParseCpuList(cpulist);
    if (!cpus.ok()) return cpus.status().WithContext((e.path() / "cpulist").string());
    node.cpus = *cpus;
    TANDEM_ASSIGN_OR_RETURN(const std::string meminfo, ReadSmallFile(e.path() / "meminfo"));
    TANDEM_ASSIGN_OR_RETURN(node.mem_total_bytes,
                            ParseMemTotal(meminfo, (e.path() / "meminfo").string()));
    topo.nodes.push_back(std::move(node));
  }
  if (topo.nodes.empty()) return NotFoundError(StrCat("NUMA topology: no node<N> in ", root));
  std::sort(topo.nodes.begin(), topo.nodes.end(),
            [](const NumaNode& a, const NumaNode& b) { return a.id < b.id; });
  return topo;
}

std::vector<int> Topology::CpuNodes() const {
  std::vector<int> out;
  for (const NumaNode& n : nodes)
    if (!n.cpus.empty()) out.push_back(n.id);
  return out;
}

std::vector<int> Topology::CxlNodes() const {
  std::vector<int> out;
  for (const NumaNode& n : nodes)
    if (n.is_cxl()) out.push_back(n.id);
  return out;
}

int Topology::NodeOfCpu(int cpu) const {
  for (const NumaNode& n : nodes) {
    if (std::find(n.cpus.begin(), n.cpus.end(), cpu) != n.cpus.end()) return n.id;
  }
  return -1;
}

// ---------------------------------------------------------------------------------------------

namespace {
constexpr const char* kKindNames[] = {"optimizer_state", "master", "weights_bf16", "grads",
                                      "activations"};
constexpr const char* kTierNames[] = {"gpu", "dram", "cxl", "nvme"};
}  // namespace

const char* StateKindName(StateKind kind) { return kKindNames[static_cast<int>(kind)]; }
const char* TierName(Tier tier) { return kTierNames[static_cast<int>(tier)]; }

StatusOr<StateKind> ParseStateKind(std::string_view name) {
  for (int i = 0; i < 5; ++i) {
    if (name == kKindNames[i]) return static_cast<StateKind>(i);
  }
  return InvalidArgumentError(StrCat("state kind: expected one of optimizer_state, master, ",
                                     "weights_bf16, grads, activations; found \"", name, "\""));
}

StatusOr<Tier> ParseTier(std::string_view name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kTierNames[i]) return static_cast<Tier>(i);
  }
  return InvalidArgumentError(
      StrCat("tier: expected one of gpu, dram, cxl, nvme; found \"", name, "\""));
}

PlacementPolicy::PlacementPolicy(Topology topology, PlacementOptions options)
    : topology_(std::move(topology)), options_(std::move(options)) {}

Placement PlacementPolicy::Place(StateKind kind) const {
  const bool hot = kind == StateKind::kOptimizerState || kind == StateKind::kMaster;
  Placement p;
  auto it = options_.overrides.find(kind);
  if (it != options_.overrides.end()) {
    p.tier = it->second;
    p.reason = StrCat(StateKindName(kind), ": override to ", TierName(p.tier));
  } else {
    p.tier = hot ? Tier::kDram : Tier::kCxl;
    p.reason = StrCat(StateKindName(kind), hot ? ": read and written every step, kept in local DRAM"
                                               : ": bandwidth-tolerant, may live in CXL memory");
  }
  const std::vector<int> cpu_nodes = topology_.CpuNodes();
  const int local =
      options_.local_node >= 0 ? options_.local_node : (cpu_nodes.empty() ? 0 : cpu_nodes.front());
  if (p.tier == Tier::kCxl) {
    p.numa_nodes = topology_.CxlNodes();
    if (p.numa_nodes.empty()) {
      p.tier = Tier::kDram;
      p.reason += "; no CPU-less (CXL) NUMA node on this machine: falling back to local DRAM";
    } else {
      p.reason += StrCat("; interleaved over ", p.numa_nodes.size(), " CXL node(s)");
    }
  }
  if (p.tier == Tier::kDram) {
    p.numa_nodes = {local};
    p.reason += StrCat(" (node ", local, ")");
  }
  return p;
}

// ---------------------------------------------------------------------------------------------

StatusOr<NumaBuffer> NumaBuffer::Allocate(size_t num_bytes, const Placement& placement) {
  NumaBuffer buf;
  buf.num_bytes_ = num_bytes;
  if (num_bytes == 0) return buf;
  const bool wants_numa = (placement.tier == Tier::kDram || placement.tier == Tier::kCxl) &&
                          !placement.numa_nodes.empty();
  if (wants_numa && numa_available() >= 0) {
    for (int node : placement.numa_nodes) {
      if (node < 0 || node > numa_max_node()) {
        return InvalidArgumentError(StrCat("NumaBuffer: placement names NUMA node ", node,
                                           ", this machine has nodes 0..", numa_max_node()));
      }
    }
    if (placement.numa_nodes.size() == 1) {
      buf.data_ = numa_alloc_onnode(num_bytes, placement.numa_nodes.front());
    } else {
      struct bitmask* mask = numa_allocate_nodemask();
      for (int node : placement.numa_nodes) numa_bitmask_setbit(mask, static_cast<unsigned>(node));
      buf.data_ = numa_alloc_interleaved_subset(num_bytes, mask);
      numa_free_nodemask(mask);
    }
    buf.numa_placed_ = buf.data_ != nullptr;
  } else if (wants_numa) {
    TANDEM_LOG(WARNING, "offload")
        << "libnuma reports NUMA unavailable; " << placement.reason << " is not enforced";
  }
  if (buf.data_ == nullptr) {
    void* p = mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return ResourceExhaustedError(
          StrCat("NumaBuffer: cannot map ", num_bytes, " bytes for ", placement.reason));
    }
    buf.data_ = p;
  }
  // First touch, spread over the cores (75 GiB for a 7B optimizer state would take a minute on
  // one): the pages land where the policy says, zeroed.
  char* bytes = static_cast<char*>(buf.data_);
  ParallelRanges(static_cast<int64_t>(num_bytes), int64_t{64} << 20, [bytes](int64_t a, int64_t b) {
    std::memset(bytes + a, 0, static_cast<size_t>(b - a));
  });
  return buf;
}

void NumaBuffer::Reset() {
  if (data_ != nullptr) {
    if (numa_placed_)
      numa_free(data_, num_bytes_);
    else
      munmap(data_, num_bytes_);
  }
  data_ = nullptr;
  num_bytes_ = 0;
  numa_placed_ = false;
}

NumaBuffer::~NumaBuffer() { Reset(); }

NumaBuffer::NumaBuffer(NumaBuffer&& o) noexcept
    : data_(o.data_), num_bytes_(o.num_bytes_), numa_placed_(o.numa_placed_) {
  o.data_ = nullptr;
  o.num_bytes_ = 0;
}

NumaBuffer& NumaBuffer::operator=(NumaBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    data_ = o.data_;
    num_bytes_ = o.num_bytes_;
    numa_placed_ = o.numa_placed_;
    o.data_ = nullptr;
    o.num_bytes_ = 0;
  }
  return *this;
}

Placement PlaceOnThisMachine(StateKind kind) {
  StatusOr<Topology> topo = Topology::ReadFromSysfs();
  if (!topo.ok()) {
    Placement plain;
    plain.reason =
        StrCat(StateKindName(kind),
               ": plain memory (the NUMA topology is unreadable: ", topo.status().message(), ")");
    return plain;
  }
  return PlacementPolicy(*std::move(topo), {}).Place(kind);
}

PlacedHostAllocator::~PlacedHostAllocator() {
  TANDEM_CHECK_MSG(live_.empty(), "PlacedHostAllocator destroyed with allocations outstanding");
}

StatusOr<void*> PlacedHostAllocator::Allocate(size_t num_bytes) {
  TANDEM_ASSIGN_OR_RETURN(NumaBuffer buf,
                          NumaBuffer::Allocate(std::max<size_t>(num_bytes, 1), placement_));
  void* p = buf.data();
  std::lock_guard<std::mutex> lock(mu_);
  live_.emplace(p, std::move(buf));
  stats_.bytes_in_use += num_bytes;
  stats_.peak_bytes_in_use = std::max(stats_.peak_bytes_in_use, stats_.bytes_in_use);
  stats_.bytes_reserved = stats_.bytes_in_use;
  ++stats_.num_allocs;
  ++stats_.num_driver_allocs;
  return p;
}

void PlacedHostAllocator::Deallocate(void* ptr, size_t num_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(ptr);
  TANDEM_CHECK_MSG(it != live_.end(), "PlacedHostAllocator::Deallocate of a pointer it never gave");
  live_.erase(it);
  stats_.bytes_in_use -= num_bytes;
  stats_.bytes_reserved = stats_.bytes_in_use;
}

AllocatorStats PlacedHostAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

}  // namespace tandem::offload
