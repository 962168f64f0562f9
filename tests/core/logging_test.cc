#include "core/logging.h"

#include <gtest/gtest.h>

#include <cctype>
#include <string>
#include <thread>
#include <vector>

namespace tandem {
namespace {

// True when `line` is "[<letter> HH:MM:SS.mmm r<rank> <subsystem>] <body>\n".
bool MatchesLine(const std::string& line, char letter, int rank, const std::string& subsystem,
                 const std::string& body) {
  const std::string head = std::string("[") + letter + " ";
  const std::string tail = " r" + std::to_string(rank) + " " + subsystem + "] " + body + "\n";
  if (line.size() != head.size() + 12 + tail.size()) return false;
  if (line.compare(0, head.size(), head) != 0) return false;
  if (line.compare(head.size() + 12, std::string::npos, tail) != 0) return false;
  const std::string time = line.substr(head.size(), 12);  // HH:MM:SS.mmm
  for (size_t i = 0; i < time.size(); ++i) {
    const bool sep = i == 2 || i == 5 || i == 8;
    if (sep ? time[i] != (i == 8 ? '.' : ':')
            : !std::isdigit(static_cast<unsigned char>(time[i]))) {
      return false;
    }
  }
  return true;
}

// Captures lines and restores default options and stderr output afterwards.
class LoggingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetLogSinkForTesting([this](std::string_view line) { lines_.emplace_back(line); });
  }
  void TearDown() override {
    SetLogSinkForTesting(nullptr);
    SetLogOptions(LogOptions{});
  }
  // Logs one message at every level for `subsystem`.
  void LogAllLevels(const char* subsystem) {
    TANDEM_LOG(DEBUG, subsystem) << "d";
    TANDEM_LOG(INFO, subsystem) << "i";
    TANDEM_LOG(WARNING, subsystem) << "w";
    TANDEM_LOG(ERROR, subsystem) << "e";
  }
  // The level letters of the captured lines, in order ("IWE").
  std::string Letters() const {
    std::string out;
    for (const std::string& l : lines_) out += l.substr(1, 1);
    return out;
  }
  std::vector<std::string> lines_;
};

TEST_F(LoggingTest, LineFormat) {
  SetLogOptions(LogOptions{LogLevel::kInfo, 0, false, ""});
  TANDEM_LOG(INFO, "train") << "step " << 7 << " loss " << 2.5;
  ASSERT_EQ(lines_.size(), 1u);
  EXPECT_TRUE(MatchesLine(lines_[0], 'I', 0, "train", "step 7 loss 2.5")) << lines_[0];
  EXPECT_FALSE(MatchesLine(lines_[0], 'I', 0, "train", "step 7 loss 2.6"));  // the matcher bites
}

TEST_F(LoggingTest, DefaultLevelIsInfo) {
  LogAllLevels("train");
  EXPECT_EQ(Letters(), "IWE");
}

TEST_F(LoggingTest, FiltersByLevel) {
  SetLogOptions(LogOptions{LogLevel::kDebug, 0, false, ""});
  LogAllLevels("x");
  EXPECT_EQ(Letters(), "DIWE");
  lines_.clear();
  SetLogOptions(LogOptions{LogLevel::kWarning, 0, false, ""});
  LogAllLevels("x");
  EXPECT_EQ(Letters(), "WE");
  lines_.clear();
  SetLogOptions(LogOptions{LogLevel::kError, 0, false, ""});
  LogAllLevels("x");
  EXPECT_EQ(Letters(), "E");
}

TEST_F(LoggingTest, OnlyRankZeroPrintsInfoUnlessAllRanks) {
  SetLogOptions(LogOptions{LogLevel::kDebug, 3, false, ""});
  LogAllLevels("train");
  EXPECT_EQ(Letters(), "WE");
  EXPECT_NE(lines_[0].find(" r3 train] w"), std::string::npos) << lines_[0];
  lines_.clear();
  SetLogOptions(LogOptions{LogLevel::kDebug, 3, true, ""});
  LogAllLevels("train");
  EXPECT_EQ(Letters(), "DIWE");
}

TEST_F(LoggingTest, SubsystemFilterAppliesToDebugAndInfoOnly) {
  SetLogOptions(LogOptions{LogLevel::kDebug, 0, false, "data, nccl"});
  LogAllLevels("train");
  EXPECT_EQ(Letters(), "WE");
  lines_.clear();
  LogAllLevels("nccl");
  LogAllLevels("data");
  EXPECT_EQ(Letters(), "DIWEDIWE");
  EXPECT_FALSE(LogEnabled(LogLevel::kInfo, "dat"));
  EXPECT_TRUE(LogEnabled(LogLevel::kInfo, "data"));
}

int Counted(int* calls) {
  ++*calls;
  return *calls;
}

TEST_F(LoggingTest, FilteredMessagesDoNotEvaluateArguments) {
  SetLogOptions(LogOptions{LogLevel::kInfo, 1, false, ""});
  int calls = 0;
  TANDEM_LOG(DEBUG, "x") << Counted(&calls);
  TANDEM_LOG(INFO, "x") << Counted(&calls);  // rank 1: filtered
  EXPECT_EQ(calls, 0);
  TANDEM_LOG(WARNING, "x") << Counted(&calls);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(lines_.size(), 1u);
}

TEST_F(LoggingTest, LogIf) {
  int conds = 0;
  auto cond = [&conds](bool v) {
    ++conds;
    return v;
  };
  TANDEM_LOG_IF(INFO, "x", cond(false)) << "no";
  TANDEM_LOG_IF(INFO, "x", cond(true)) << "yes";
  TANDEM_LOG_IF(DEBUG, "x", cond(true)) << "filtered by level";
  ASSERT_EQ(lines_.size(), 1u);
  EXPECT_NE(lines_[0].find("] yes\n"), std::string::npos);
  EXPECT_EQ(conds, 2);  // not evaluated for the filtered DEBUG line
  // Works as the body of an unbraced if/else.
  if (conds == 2)
    TANDEM_LOG_IF(ERROR, "x", true) << "then";
  else
    TANDEM_LOG(ERROR, "x") << "else";
  ASSERT_EQ(lines_.size(), 2u);
  EXPECT_NE(lines_[1].find("] then\n"), std::string::npos);
}

TEST_F(LoggingTest, LinesFromManyThreadsStayWhole) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < kPerThread; ++i) {
        TANDEM_LOG(INFO, "mt") << "thread " << t << " message " << i << " end";
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(lines_.size(), static_cast<size_t>(kThreads * kPerThread));
  std::vector<int> next(kThreads, 0);  // each thread's messages arrive whole and in order
  for (const std::string& l : lines_) {
    const int t = l[l.find("thread ") + 7] - '0';
    ASSERT_TRUE(t >= 0 && t < kThreads) << l;
    const std::string body =
        "thread " + std::to_string(t) + " message " + std::to_string(next[t]++) + " end";
    ASSERT_TRUE(MatchesLine(l, 'I', 0, "mt", body)) << l;
  }
}

TEST_F(LoggingTest, ParseLogLevel) {
  EXPECT_EQ(*ParseLogLevel("DEBUG"), LogLevel::kDebug);
  EXPECT_EQ(*ParseLogLevel("info"), LogLevel::kInfo);
  EXPECT_EQ(*ParseLogLevel("Warn"), LogLevel::kWarning);
  EXPECT_EQ(*ParseLogLevel("error"), LogLevel::kError);
  StatusOr<LogLevel> bad = ParseLogLevel("loud");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'loud'"), std::string::npos);
}

}  // namespace
}  // namespace tandem
