// dp2 x cp2 x tp2 on 8 in-process ranks (a thread group; the same harness as the mpi tests):
// loss, gradients and weights after 5 AdamW steps match one rank, with and without ZeRO-1.
#include <gtest/gtest.h>

#include <thread>

#include "collectives/thread_group.h"
#include "tests/parallel/parallel_test_util.h"

namespace tandem::parallel {
namespace {

void Run8(bool zero) {
  const MeshShape shape{2, 2, 2};
  const testing::StepOptions so;
  const testing::RunResult ref = testing::ReferenceRun(false, so);
  auto comms = collectives::CreateThreadGroup(8, {.timeout_s = 60});
  std::vector<StatusOr<testing::RunResult>> got(8, InternalError("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < 8; ++r) {
    threads.emplace_back([&, r] { got[r] = testing::MeshRun(*comms[r], shape, false, zero, so); });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < 8; ++r) {
    ASSERT_TRUE(got[r].ok()) << "rank " << r << ": " << got[r].status().ToString();
    testing::ExpectMatches(*got[r], ref, !zero);
  }
}

TEST(Mesh8, Dp2Cp2Tp2MatchesOneRank) { Run8(false); }
TEST(Mesh8, Dp2Cp2Tp2WithZero1MatchesOneRank) { Run8(true); }

}  // namespace
}  // namespace tandem::parallel
