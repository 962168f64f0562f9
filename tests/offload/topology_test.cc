// Topology and placement: parsing CPU lists, reading a fake /sys/devices/system/node tree with
// CPU-less (CXL) nodes, the placement rule with and without CXL, overrides and their fallback,
// name parsing, the real sysfs of this machine, and NUMA-placed host buffers.
#include "offload/topology.h"

#include <numaif.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/tensor.h"
#include "tests/common/testing.h"

namespace tandem::offload {
namespace {

using tandem::testing::TempDir;
namespace fs = std::filesystem;

void WriteFile(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << text;
}

void FakeNode(const TempDir& dir, int id, const std::string& cpulist, uint64_t kb) {
  const fs::path node = fs::path(dir.path()) / StrCat("node", id);
  WriteFile(node / "cpulist", cpulist + "\n");
  WriteFile(node / "meminfo", StrCat("Node ", id, " MemTotal:       ", kb, " kB\nNode ", id,
                                     " MemFree:        100 kB\n"));
}

TEST(TopologyTest, ParsesCpuLists) {
  EXPECT_EQ(*ParseCpuList("0-3,8,10-11\n"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(*ParseCpuList("5"), (std::vector<int>{5}));
  EXPECT_TRUE(ParseCpuList("\n")->empty());
  for (const char* bad : {"a", "3-1", "1,,2", "1-", "-2"}) {
    EXPECT_EQ(ParseCpuList(bad).status().code(), StatusCode::kInvalidArgument) << bad;
  }
}

TEST(TopologyTest, ReadsFakeSysfsWithCxlNodes) {
  TempDir dir;
  FakeNode(dir, 0, "0-3", 1000);
  FakeNode(dir, 1, "4-7", 2000);
  FakeNode(dir, 2, "", 64 << 20);  // CPU-less: CXL
  FakeNode(dir, 3, "", 32 << 20);
  WriteFile(fs::path(dir.path()) / "possible", "0-3\n");  // not a node directory
  fs::create_directories(fs::path(dir.path()) / "power");
  auto topo = Topology::ReadFromSysfs(dir.path());
  ASSERT_TRUE(topo.ok()) << topo.status().ToString();
  ASSERT_EQ(topo->nodes.size(), 4u);
  EXPECT_EQ(topo->nodes[1].cpus, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(topo->nodes[2].mem_total_bytes, uint64_t{64 << 20} * 1024);
  EXPECT_EQ(topo->CpuNodes(), (std::vector<int>{0, 1}));
  EXPECT_EQ(topo->CxlNodes(), (std::vector<int>{2, 3}));
  EXPECT_EQ(topo->NodeOfCpu(6), 1);
  EXPECT_EQ(topo->NodeOfCpu(99), -1);

  PlacementPolicy policy(*topo, {});
  for (StateKind k : {StateKind::kOptimizerState, StateKind::kMaster}) {
    const Placement p = policy.Place(k);
    EXPECT_EQ(p.tier, Tier::kDram) << StateKindName(k);
    EXPECT_EQ(p.numa_nodes, (std::vector<int>{0}));
  }
  for (StateKind k : {StateKind::kWeightsBf16, StateKind::kGrads, StateKind::kActivations}) {
    const Placement p = policy.Place(k);
    EXPECT_EQ(p.tier, Tier::kCxl) << StateKindName(k);
    EXPECT_EQ(p.numa_nodes, (std::vector<int>{2, 3})) << p.reason;
    EXPECT_NE(p.reason.find("interleaved over 2 CXL"), std::string::npos) << p.reason;
  }
  PlacementOptions o;
  o.overrides[StateKind::kOptimizerState] = Tier::kNvme;
  o.overrides[StateKind::kGrads] = Tier::kDram;
  o.local_node = 1;
  PlacementPolicy custom(*topo, o);
  EXPECT_EQ(custom.Place(StateKind::kOptimizerState).tier, Tier::kNvme);
  EXPECT_TRUE(custom.Place(StateKind::kOptimizerState).numa_nodes.empty());
  EXPECT_EQ(custom.Place(StateKind::kGrads).numa_nodes, (std::vector<int>{1}));
  EXPECT_NE(custom.Place(StateKind::kGrads).reason.find("override"), std::string::npos);
  EXPECT_EQ(custom.Place(StateKind::kMaster).numa_nodes, (std::vector<int>{1}));
}

TEST(TopologyTest, WithoutCxlEverythingFallsBackToDramAndSaysSo) {
  TempDir dir;
  FakeNode(dir, 0, "0-1", 8000000);
  auto topo = Topology::ReadFromSysfs(dir.path());
  ASSERT_TRUE(topo.ok());
  EXPECT_TRUE(topo->CxlNodes().empty());
  PlacementOptions o;
  o.overrides[StateKind::kMaster] = Tier::kCxl;  // asked for, not available
  PlacementPolicy policy(*topo, o);
  for (StateKind k :
       {StateKind::kWeightsBf16, StateKind::kGrads, StateKind::kActivations, StateKind::kMaster}) {
    const Placement p = policy.Place(k);
    EXPECT_EQ(p.tier, Tier::kDram) << StateKindName(k);
    EXPECT_EQ(p.numa_nodes, (std::vector<int>{0}));
    EXPECT_NE(p.reason.find("falling back to local DRAM"), std::string::npos) << p.reason;
  }
  EXPECT_EQ(policy.Place(StateKind::kOptimizerState).reason.find("falling back"),
            std::string::npos);
}

TEST(TopologyTest, BadTreesAreClearErrors) {
  TempDir empty;
  EXPECT_EQ(Topology::ReadFromSysfs(empty.path()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(Topology::ReadFromSysfs(empty.Join("missing")).status().code(), StatusCode::kNotFound);
  TempDir bad;
  FakeNode(bad, 0, "0-x", 10);
  const Status st = Topology::ReadFromSysfs(bad.path()).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("cpulist"), std::string::npos) << st.message();
  TempDir no_mem;
  FakeNode(no_mem, 0, "0", 10);
  WriteFile(fs::path(no_mem.path()) / "node0" / "meminfo", "garbage\n");
  EXPECT_EQ(Topology::ReadFromSysfs(no_mem.path()).status().code(), StatusCode::kInvalidArgument);
}

TEST(TopologyTest, NamesRoundTrip) {
  for (StateKind k : {StateKind::kOptimizerState, StateKind::kMaster, StateKind::kWeightsBf16,
                      StateKind::kGrads, StateKind::kActivations}) {
    EXPECT_EQ(*ParseStateKind(StateKindName(k)), k);
  }
  for (Tier t : {Tier::kGpu, Tier::kDram, Tier::kCxl, Tier::kNvme}) {
    EXPECT_EQ(*ParseTier(TierName(t)), t);
  }
  EXPECT_EQ(ParseTier("hbm").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseStateKind("moments").status().code(), StatusCode::kInvalidArgument);
}

// This machine: at least one node with CPUs; a DRAM buffer lands on the chosen node.
TEST(TopologyTest, RealSysfsAndNumaBuffer) {
  auto topo = Topology::ReadFromSysfs();
  if (!topo.ok()) GTEST_SKIP() << "no NUMA sysfs here: " << topo.status().ToString();
  ASSERT_FALSE(topo->CpuNodes().empty());
  PlacementPolicy policy(*topo, {});
  const Placement p = policy.Place(StateKind::kOptimizerState);
  auto buf = NumaBuffer::Allocate(1 << 20, p);
  ASSERT_TRUE(buf.ok()) << buf.status().ToString();
  ASSERT_NE(buf->data(), nullptr);
  static_cast<char*>(buf->data())[12345] = 7;
  if (buf->numa_placed()) {
    int node = -1;
    ASSERT_EQ(get_mempolicy(&node, nullptr, 0, buf->data(), MPOL_F_NODE | MPOL_F_ADDR), 0);
    EXPECT_EQ(node, p.numa_nodes.front());
  }
  NumaBuffer moved = std::move(*buf);
  EXPECT_EQ(static_cast<char*>(moved.data())[12345], 7);
  Placement bogus = p;
  bogus.numa_nodes = {4000};
  EXPECT_EQ(NumaBuffer::Allocate(4096, bogus).status().code(), StatusCode::kInvalidArgument);
  Placement nvme;
  nvme.tier = Tier::kNvme;
  auto plain = NumaBuffer::Allocate(4096, nvme);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->numa_placed());
}

// PlaceOnThisMachine gives the rule's placement on the real topology; PlacedHostAllocator hands
// out zeroed memory placed by it through the Allocator interface, and counts it.
TEST(TopologyTest, PlacedHostAllocatorServesTensors) {
  const Placement p = PlaceOnThisMachine(StateKind::kWeightsBf16);
  EXPECT_NE(p.reason.find("weights_bf16"), std::string::npos) << p.reason;
  PlacedHostAllocator alloc(p);
  {
    StatusOr<Tensor> t = Tensor::Empty({3, 1000}, DType::kF32, alloc);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    EXPECT_TRUE(t->device().is_cpu());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t->raw_data()) % 256, 0u);
    for (int64_t i = 0; i < t->numel(); ++i) ASSERT_EQ(t->data<float>()[i], 0.0f);
    t->data<float>()[2999] = 5.0f;
    EXPECT_EQ(alloc.stats().bytes_in_use, 12000u);
    EXPECT_EQ(alloc.stats().num_allocs, 1);
  }
  EXPECT_EQ(alloc.stats().bytes_in_use, 0u);
  EXPECT_EQ(alloc.stats().peak_bytes_in_use, 12000u);
}

}  // namespace
}  // namespace tandem::offload
