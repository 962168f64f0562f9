// Slow agent tests: four agents with Reed-Solomon parity (k=2, m=2) lose two whole nodes at once;
// both are rebuilt bitwise from the two survivors' fragments.
#include "checkpoint/agent.h"

#include "tests/checkpoint/agent_test_util.h"

namespace tandem::checkpoint {
namespace {

using namespace testing_agent;  // NOLINT: test helpers

TEST(Agent, FourAgentsRebuildTwoKilledNodesFromReedSolomon) { LoseNodesAndRebuild(2, 2, {0, 3}); }

}  // namespace
}  // namespace tandem::checkpoint
