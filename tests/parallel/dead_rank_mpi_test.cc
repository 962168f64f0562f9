// mpi-ranks: 2
// mpirun-flags: --enable-recovery
// A tp2 training step in which rank 1 is killed (SIGKILL) inside the forward pass, between two
// tensor-parallel all-reduces: rank 0's ForwardBackward fails within the collective timeout with
// DeadlineExceeded naming rank 1, and nothing hangs.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>

#include "collectives/mpi.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/parallel/parallel_test_util.h"

namespace tandem::parallel {
namespace {

// MeshModelHooks that kill this process at its `kill_at`-th tp all-reduce.
class KillingHooks : public MeshModelHooks {
 public:
  KillingHooks(ops::Context& ctx, collectives::Communicator* tp, int kill_at)
      : MeshModelHooks(ctx, tp, nullptr), kill_at_(kill_at) {}
  Status TpAllReduceSum(Tensor& inout) override {
    if (++calls_ == kill_at_) std::raise(SIGKILL);
    return MeshModelHooks::TpAllReduceSum(inout);
  }

 private:
  int kill_at_;
  int calls_ = 0;
};

TEST(DeadRank, RankKilledInATpStepIsNamedWithinTheTimeout) {
  const double timeout_s = 2.0;
  auto world = collectives::CreateMpiWorld({.timeout_s = timeout_s});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  const MeshShape shape{1, 1, 2};
  auto groups = CreateMeshGroups(**world, shape);
  ASSERT_TRUE(groups.ok()) << groups.status().ToString();
  auto ctx = ops::Context::Cpu();
  // Rank 1 dies at its 3rd all-reduce (inside layer 0 of the forward pass); rank 0 never does.
  KillingHooks hooks(*ctx, groups->tp.get(), groups->tp->rank() == 1 ? 3 : -1);
  model::ModelOptions mo;
  mo.parallel = {groups->coords.tp, 2, 0, 1, &hooks};
  auto m = model::LlamaModel::Create(*ctx, testing::SmallConfig(false), mo);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_TRUE((*m)->InitRandom(testing::kInitSeed, testing::kInitStd).ok());
  const testing::GlobalBatch g = testing::MakeBatch(1, 301);
  const auto t0 = std::chrono::steady_clock::now();
  auto loss = (*m)->ForwardBackward(testing::LocalBatch(g, shape, groups->coords), 0.01f);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_FALSE(loss.ok());
  EXPECT_EQ(loss.status().code(), StatusCode::kDeadlineExceeded) << loss.status().ToString();
  EXPECT_NE(loss.status().message().find("group 'tp'"), std::string::npos)
      << loss.status().message();
  EXPECT_NE(loss.status().message().find("rank 1"), std::string::npos) << loss.status().message();
  EXPECT_LT(seconds, timeout_s + 2.0);
}

}  // namespace
}  // namespace tandem::parallel

TANDEM_MPI_TEST_MAIN_RANKS_MAY_DIE()
