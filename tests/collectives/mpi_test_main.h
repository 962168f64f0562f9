// A GoogleTest main for test binaries run under mpirun (and as a single process without it):
// initializes MPI through MpiRuntime, runs every test on every rank, prints the full report on
// rank 0 and only failures (prefixed with the rank) elsewhere, then finalizes with the timed
// barrier. A rank whose test fails exits non-zero, so mpirun does too.
//
//   TANDEM_MPI_TEST_MAIN()      // once, at the end of the test file
//   const auto& mpi = tandem::collectives::testing::Mpi();   // inside tests
//
// Every rank must run the same tests in the same order: decide skips from facts all ranks share
// (world size, GPU count), never from the rank.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

#include "collectives/mpi.h"
#include "core/logging.h"

namespace tandem::collectives::testing {

inline MpiRuntime*& MpiSlot() {
  static MpiRuntime* runtime = nullptr;  // set once by RunMpiTests, before any test runs
  return runtime;
}
inline const MpiRuntime& Mpi() {
  TANDEM_CHECK_MSG(MpiSlot() != nullptr, "Mpi() outside TANDEM_MPI_TEST_MAIN");
  return *MpiSlot();
}

// Prints failures of a non-zero rank, which has no default printer.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
    }
  }

 private:
  int rank_;
};

// `ranks_may_die`: for tests that kill a rank (run with mpirun --enable-recovery): a dead peer
// makes the final barrier impossible, so each surviving rank prints
// "mpi-test-result: rank R passed|FAILED" and exits at once without finalizing MPI. mpirun's
// exit status means nothing under --enable-recovery; ctest reads these lines instead.
inline int RunMpiTests(int argc, char** argv, bool ranks_may_die = false) {
  CollectiveOptions options;
  options.timeout_s = 120;  // Init and the final barrier; tests set their own timeouts
  auto runtime = MpiRuntime::Init(&argc, &argv, options);
  if (!runtime.ok()) {
    std::fprintf(stderr, "MPI initialization failed: %s\n", runtime.status().ToString().c_str());
    return 1;
  }
  MpiSlot() = &*runtime;
  LogOptions log;
  log.rank = runtime->world_rank();
  SetLogOptions(log);
  ::testing::InitGoogleTest(&argc, argv);
  if (runtime->world_rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(runtime->world_rank()));
  }
  const int rc = RUN_ALL_TESTS();
  if (ranks_may_die) {
    std::printf("mpi-test-result: rank %d %s\n", runtime->world_rank(),
                rc == 0 ? "passed" : "FAILED");
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(rc);
  }
  const Status finalized = runtime->Finalize();
  MpiSlot() = nullptr;
  if (!finalized.ok()) {
    std::fprintf(stderr, "[rank %d] MPI finalize failed: %s\n", runtime->world_rank(),
                 finalized.ToString().c_str());
    return 1;
  }
  return rc;
}

}  // namespace tandem::collectives::testing

#define TANDEM_MPI_TEST_MAIN()                                      \
  int main(int argc, char** argv) {                                 \
    return ::tandem::collectives::testing::RunMpiTests(argc, argv); \
  }
// For tests that kill ranks; see RunMpiTests.
#define TANDEM_MPI_TEST_MAIN_RANKS_MAY_DIE()                              \
  int main(int argc, char** argv) {                                       \
    return ::tandem::collectives::testing::RunMpiTests(argc, argv, true); \
  }
