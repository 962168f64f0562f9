// Crash during a universal checkpoint save: a forked child saves checkpoints and is SIGKILLed at
// every publishing stage and at random moments; the directory's `latest` must always name a
// complete, verifiable checkpoint with the data of its step, and the next save must work.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <random>
#include <thread>

#include "checkpoint/universal.h"
#include "tests/checkpoint/universal_test_util.h"
#include "tests/common/testing.h"

namespace tandem::checkpoint {
namespace {

using testing::MetaFor;
using testing::ShardsOf;

// Saves steps 2, 3, ... in a child; `kill_stage` non-empty: the child kills itself at that stage
// of step 3; else the parent kills it after `kill_after_us`.
void RunAndKill(const std::string& dir, const std::string& kill_stage, int kill_after_us) {
  const pid_t pid = fork();
  if (pid == 0) {
    for (int64_t step = 2; step < 100000; ++step) {
      SaveOptions options;
      options.keep_last = 2;
      options.on_stage = [&](const std::string& stage) {
        if (step == 3 && stage == kill_stage) raise(SIGKILL);
      };
      if (!SaveUniversal(dir, MetaFor(step, 1, 1), ShardsOf(0, 0, 1, step, step), nullptr, options)
               .ok()) {
        _exit(3);
      }
    }
    _exit(0);
  }
  if (kill_stage.empty()) {
    std::this_thread::sleep_for(std::chrono::microseconds(kill_after_us));
    kill(pid, SIGKILL);
  }
  int wstatus = 0;
  waitpid(pid, &wstatus, 0);
  EXPECT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << "child status " << wstatus;
}

// `latest` names a complete checkpoint whose data is its step's; returns that step.
int64_t CheckLatest(const std::string& dir) {
  auto reader = UniversalReader::Open(dir);
  EXPECT_TRUE(reader.ok()) << reader.status().ToString();
  if (!reader.ok()) return -1;
  EXPECT_TRUE(reader->VerifyAll().ok());
  const int64_t step = reader->meta().step;
  testing::ExpectReadsMatch(*reader, 0, 1, static_cast<uint64_t>(step));
  return step;
}

void ExpectNextSaveWorks(const std::string& dir) {
  auto path = SaveUniversal(dir, MetaFor(500, 1, 1), ShardsOf(0, 0, 1, 500, 500), nullptr,
                            {.keep_last = 2});
  ASSERT_TRUE(path.ok()) << path.status().ToString();
  EXPECT_EQ(CheckLatest(dir), 500);
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
  }
}

TEST(UniversalCrash, KillAtEveryPublishingStage) {
  // Stages before the rename of `latest` leave step 2 as the newest; after it, step 3.
  const std::vector<std::pair<std::string, int64_t>> stages = {
      {"declared", 2},       {"written", 2},        {"synced", 2}, {"renamed", 2},
      {"latest_written", 2}, {"latest_renamed", 3}, {"pruned", 3}};
  for (const auto& [stage, expected] : stages) {
    SCOPED_TRACE(stage);
    ::tandem::testing::TempDir dir;
    ASSERT_TRUE(SaveUniversal(dir.path(), MetaFor(1, 1, 1), ShardsOf(0, 0, 1, 1, 1), nullptr,
                              {.keep_last = 2})
                    .ok());
    RunAndKill(dir.path(), stage, 0);
    EXPECT_EQ(CheckLatest(dir.path()), expected);
    ExpectNextSaveWorks(dir.path());
  }
}

TEST(UniversalCrash, KillAtRandomMoments) {
  for (uint64_t seed : {1, 2, 3, 4, 5, 6, 7, 8}) {
    SCOPED_TRACE(seed);
    ::tandem::testing::TempDir dir;
    ASSERT_TRUE(SaveUniversal(dir.path(), MetaFor(1, 1, 1), ShardsOf(0, 0, 1, 1, 1), nullptr,
                              {.keep_last = 2})
                    .ok());
    std::mt19937_64 rng(seed);
    RunAndKill(dir.path(), "", static_cast<int>(rng() % 150000));
    EXPECT_GE(CheckLatest(dir.path()), 1);
    ExpectNextSaveWorks(dir.path());
  }
}

}  // namespace
}  // namespace tandem::checkpoint
