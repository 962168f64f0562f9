// mpi-ranks: 3
// mpirun-flags: --enable-recovery
// A rank killed (SIGKILL) while the others wait for it in a collective: their call fails
// within the timeout with DeadlineExceeded naming the dead rank, and nothing hangs.
// --enable-recovery keeps mpirun from killing the survivors along with it.
#include <gtest/gtest.h>

#include <csignal>
#include <thread>

#include "collectives/mpi.h"
#include "tests/collectives/collectives_test_util.h"
#include "tests/collectives/mpi_test_main.h"

namespace tandem::collectives {
namespace {

TEST(DeadRank, ARankKilledWhileOthersWaitIsNamedBySurvivors) {
  auto world = CreateMpiWorld({.timeout_s = 1.5});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  Communicator& comm = **world;
  const int victim = comm.size() - 1;
  Tensor x = testing::RankInput(DType::kF32, 1000, 1, comm.rank());
  ASSERT_TRUE(comm.AllReduce(x, ReduceOp::kSum).ok());  // everyone alive so far
  if (comm.rank() == victim) {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the others are waiting now
    std::raise(SIGKILL);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const Status s = comm.AllReduce(x, ReduceOp::kSum);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("group 'world'"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("AllReduce #2"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(StrCat("rank ", victim, " did not arrive (no answer")),
            std::string::npos)
      << s.message();
  EXPECT_LT(testing::SecondsSince(t0), 1.5 + 1.0);
  EXPECT_TRUE(comm.Close().ok());
}

}  // namespace
}  // namespace tandem::collectives

TANDEM_MPI_TEST_MAIN_RANKS_MAY_DIE()
