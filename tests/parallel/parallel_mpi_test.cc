// mpi-ranks: 2 4
// Every mesh of the world size under mpirun (CPU, f32): loss, gradient norm and every gradient
// (gathered to logical shape) of step 1 match a single-rank run of the same global batch, and
// so do the weights after 5 AdamW steps, with and without ZeRO-1. Tolerances: see
// parallel_test_util.h.
#include <gtest/gtest.h>

#include "collectives/mpi.h"
#include "tests/collectives/mpi_test_main.h"
#include "tests/parallel/parallel_test_util.h"

namespace tandem::parallel::testing {
namespace {

using Case = MeshCase;

void RunCase(const Case& c, bool zero) {
  auto world = collectives::CreateMpiWorld({.timeout_s = 30});
  ASSERT_TRUE(world.ok()) << world.status().ToString();
  if ((*world)->size() != c.dp * c.cp * c.tp) {
    EXPECT_TRUE((*world)->Close().ok());
    GTEST_SKIP() << "mesh for " << c.dp * c.cp * c.tp << " ranks";
  }
  const StepOptions so;
  const RunResult ref = ReferenceRun(c.tied, so);
  auto got = MeshRun(**world, MeshShape{c.dp, c.cp, c.tp}, c.tied, zero, so);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ExpectMatches(*got, ref, /*check_grads=*/!zero);
  EXPECT_TRUE((*world)->Close().ok());
}

class MeshParity : public ::testing::TestWithParam<Case> {};

TEST_P(MeshParity, MatchesOneRank) { RunCase(GetParam(), /*zero=*/false); }
TEST_P(MeshParity, MatchesOneRankWithZero1) { RunCase(GetParam(), /*zero=*/true); }

INSTANTIATE_TEST_SUITE_P(Meshes, MeshParity,
                         ::testing::Values(Case{2, 1, 1, false}, Case{1, 1, 2, false},
                                           Case{1, 2, 1, false}, Case{1, 1, 2, true},
                                           Case{2, 1, 2, false}, Case{2, 2, 1, false},
                                           Case{1, 2, 2, false}, Case{1, 1, 4, false},
                                           Case{1, 1, 4, true}),
                         MeshCaseName);

}  // namespace
}  // namespace tandem::parallel::testing

TANDEM_MPI_TEST_MAIN()
