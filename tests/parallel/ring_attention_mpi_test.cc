// mpi-ranks: 2 4
// Ring attention across processes (MPI host communicator, cp = world size): every rank rebuilds
// the same global problem from fixed seeds, runs the ring on its zig-zag share, and the shares,
// all-gathered back to global order, equal ops::AttentionForward/Backward over the whole
// sequence (f32, kRingF32Tol). Also a cp group split from the world (cp = world / 2 when the world
// is even and > 2), as a mesh's cp axis would be.
#include <gtest/gtest.h>

#include <memory>

#include "collectives/mpi.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/parallel/ring_attention_test_util.h"

namespace tandem::parallel {
namespace {

using testing::RingCase;
using testing::RingProblem;
using testing::RingResult;

std::unique_ptr<collectives::Communicator> World() {
  auto world = collectives::CreateMpiWorld({.timeout_s = 60});
  TANDEM_CHECK_OK(world.status());
  return std::move(*world);
}

// Sums every rank's RingResult (each rank wrote only its own positions, the rest are zeros), so
// every rank sees the whole gathered result.
void SumOverRanks(collectives::Communicator& comm, RingResult& r) {
  for (Tensor* t : {&r.out, &r.lse, &r.dq, &r.dk, &r.dv}) {
    Tensor flat = t->View({t->numel()});
    TANDEM_CHECK_OK(comm.AllReduce(flat, collectives::ReduceOp::kSum));
  }
}

void RunCase(collectives::Communicator& cp, const RingCase& c, uint64_t seed) {
  SCOPED_TRACE(::testing::Message() << "cp=" << cp.size() << " B=" << c.b << " T=" << c.t
                                    << " Hq=" << c.hq << " Hkv=" << c.hkv << " D=" << c.d);
  const RingProblem p = testing::MakeProblem(c, seed);
  RingResult r = testing::EmptyResult(p);
  const Status st = testing::RunRingRank(cp, p, r);
  ASSERT_TRUE(st.ok()) << st.ToString();
  SumOverRanks(cp, r);
  testing::ExpectMatchesReference(r, p);
}

TEST(RingAttentionMpi, WorldRingMatchesSingleProcess) {
  auto world = World();
  const int64_t n = world->size();
  RunCase(*world, {2, 2 * n * 3, 3, 1, 16}, 100);  // odd chunk length, GQA
  RunCase(*world, {1, 2 * n * 5, 4, 2, 16}, 200);
  EXPECT_TRUE(world->Close().ok());
}

TEST(RingAttentionMpi, SplitCpGroupsMatchSingleProcess) {
  auto world = World();
  if (world->size() < 4 || world->size() % 2 != 0) {
    EXPECT_TRUE(world->Close().ok());
    GTEST_SKIP() << "needs an even world of at least 4 ranks";
  }
  // Two cp groups (ranks {0, 1, ..} and the rest) run different problems at once.
  const int half = world->size() / 2;
  const int color = world->rank() / half;
  auto cp = world->Split(color, world->rank(), "cp");
  ASSERT_TRUE(cp.ok()) << cp.status().ToString();
  RunCase(**cp, {2, 2 * half * 3, 3, 3, 16}, 300 + color);
  EXPECT_TRUE((*cp)->Close().ok());
  EXPECT_TRUE(world->Close().ok());
}

}  // namespace
}  // namespace tandem::parallel

TANDEM_MPI_TEST_MAIN()
