// Soak (label slow) of issue #8's fault handling: one `tandem train` job under mpirun (dp2 over
// 2 emulated nodes, one agent each, a snapshot every update) is killed 20 times, each time a
// random rank with SIGKILL a random 2 to 6 updates after the previous kill, and relaunched with
// --resume. Every relaunch must resume from the agents' snapshot losing at most one update, and
// the job, once it finally finishes, must hold weights and Adam moments bitwise equal to an
// uninterrupted run. f32 on the CPU, the fixture of fault_mpi_e2e_test.cc.
#include <gtest/gtest.h>
#include <signal.h>

#include "tests/trainer/fault_mpi_fixture.h"

namespace tandem::fault_testing {
namespace {

constexpr int kKills = 20;

class FaultSoakTest : public FaultMpiTest {
 protected:
  FaultSoakTest() { steps_ = 150; }
};

TEST_F(FaultSoakTest, TwentyKillsOfRandomRanksAtRandomUpdates) {
  StartAgents("soak");
  Reference(false);
  int64_t last = 0;
  for (int k = 0; k < kKills; ++k) {
    const int64_t at = HeartbeatStep(Heartbeat("run")) + RandomStep(2, 6);
    const int victim = static_cast<int>(gen_() % 2);
    SCOPED_TRACE(::testing::Message() << "seed " << seed_ << ": kill " << k + 1 << " of " << kKills
                                      << ", rank " << victim << " after step " << at);
    ASSERT_LT(at, steps_) << "the run is too short for " << kKills << " kills";
    auto job = StartJobUntil("run", false, at);
    const pid_t pid = RankPid(job->pid(), victim);
    ASSERT_GT(pid, 0) << "no rank " << victim << " under mpirun " << job->pid();
    kill(pid, SIGKILL);
    ExpectJobEnds(*job, "run", kCollectiveTimeoutS + 15);
    if (k > 0) ExpectResumedFromSnapshot(ReadFile(Log("run", 1)), last);
    if (HasFatalFailure()) return;
    last = HeartbeatStep(Heartbeat("run"));
  }
  ExpectResumedFromSnapshot(Relaunch("run", false), last);
  ExpectFinalEqualsReference("run", false);
}

}  // namespace
}  // namespace tandem::fault_testing
