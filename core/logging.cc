#include "core/logging.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <vector>

namespace tandem {
namespace {

// The process-wide logging state: options (written once at startup, then only read) and the
// output side (sink and its mutex).
struct LogState {
  LogOptions options;
  std::vector<std::string> subsystems;  // `options.subsystems` split on commas
  std::mutex mu;                        // serializes writes and guards `sink`
  std::function<void(std::string_view)> sink;
};

LogState& State() {
  static LogState* const state = new LogState();  // never destroyed: logging works during exit
  return *state;
}

std::vector<std::string> SplitList(std::string_view text) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string_view::npos) comma = text.size();
    std::string_view part = text.substr(start, comma - start);
    while (!part.empty() && part.front() == ' ') part.remove_prefix(1);
    while (!part.empty() && part.back() == ' ') part.remove_suffix(1);
    if (!part.empty()) parts.emplace_back(part);
    start = comma + 1;
  }
  return parts;
}

char LevelLetter(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return 'D';
    case LogLevel::kInfo:
      return 'I';
    case LogLevel::kWarning:
      return 'W';
    case LogLevel::kError:
      return 'E';
  }
  return '?';
}

// "12:00:01.123" in local time.
std::string TimeOfDay() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  localtime_r(&secs, &tm);
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%02d:%02d:%02d.%03d", tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(ms));
  return buf;
}

}  // namespace

void SetLogOptions(const LogOptions& options) {
  LogState& s = State();
  s.options = options;
  s.subsystems = SplitList(options.subsystems);
}

const LogOptions& GetLogOptions() { return State().options; }

StatusOr<LogLevel> ParseLogLevel(std::string_view text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warning" || lower == "warn") return LogLevel::kWarning;
  if (lower == "error") return LogLevel::kError;
  return InvalidArgumentError(
      StrCat("bad log level '", text, "' (expected debug, info, warning or error)"));
}

bool LogEnabled(LogLevel level, std::string_view subsystem) {
  const LogState& s = State();
  if (level < s.options.level) return false;
  if (level >= LogLevel::kWarning) return true;
  if (!s.options.all_ranks && s.options.rank != 0) return false;
  if (s.subsystems.empty()) return true;
  return std::find(s.subsystems.begin(), s.subsystems.end(), subsystem) != s.subsystems.end();
}

void SetLogSinkForTesting(std::function<void(std::string_view line)> sink) {
  LogState& s = State();
  std::lock_guard<std::mutex> lock(s.mu);
  s.sink = std::move(sink);
}

namespace internal {

LogMessage::LogMessage(LogLevel level, std::string_view subsystem)
    : level_(level), subsystem_(subsystem) {}

LogMessage::~LogMessage() {
  LogState& s = State();
  std::string line = StrCat("[", LevelLetter(level_), " ", TimeOfDay(), " r", s.options.rank, " ",
                            subsystem_, "] ", stream_.str());
  if (line.empty() || line.back() != '\n') line += '\n';
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.sink) {
    s.sink(line);
  } else {
    std::fwrite(line.data(), 1, line.size(), stderr);
    std::fflush(stderr);
  }
}

}  // namespace internal
}  // namespace tandem
