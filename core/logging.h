// Logging: levels, subsystems and rank filtering for human-readable progress and diagnostics.
//
//   TANDEM_LOG(INFO, "train") << "step " << step << " loss " << loss;
//   TANDEM_LOG_IF(WARNING, "data", skipped > 0) << skipped << " samples skipped";
//
// writes one line to stderr:  [I 12:00:01.123 r0 train] step 1 loss 2.5
// (level letter D/I/W/E, local wall-clock time with milliseconds, rank, subsystem).
//
// Filtering (LogOptions): a message is written when its level is at least `level`, and
//  - WARNING and ERROR are written on every rank and for every subsystem;
//  - DEBUG and INFO are written on rank 0 only (every rank when `all_ranks`), and only for the
//    subsystems listed in `subsystems` (comma-separated; empty means all).
// When a message is filtered out, the `<<` arguments are not evaluated. Never log in a hot loop;
// per-step numbers go to metrics.jsonl.
//
// Process-wide state: LogOptions is tandem's one process-wide setting. Call SetLogOptions once at
// startup, before any thread that logs is started; it is read without locking afterwards.
// Writing is thread-safe: each message is one whole line, never interleaved with another.
#pragma once

#include <functional>
#include <sstream>
#include <string>
#include <string_view>

#include "core/status.h"

namespace tandem {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

struct LogOptions {
  LogLevel level = LogLevel::kInfo;  // the least severe level written
  int rank = 0;                      // this process's rank, shown in every line
  bool all_ranks = false;            // DEBUG/INFO from every rank, not only rank 0
  std::string subsystems;            // "train,data": DEBUG/INFO only from these; "" = all
};

// Sets the process-wide options (see the header comment for when it may be called).
void SetLogOptions(const LogOptions& options);
const LogOptions& GetLogOptions();

// "debug", "info", "warning" (or "warn"), "error", case-insensitive.
StatusOr<LogLevel> ParseLogLevel(std::string_view text);

// True when a message of this level and subsystem would be written.
bool LogEnabled(LogLevel level, std::string_view subsystem);

// Sends each finished line (with its trailing '\n') to `sink` instead of stderr; an empty
// function restores stderr. For tests only; calls to the sink are serialized.
void SetLogSinkForTesting(std::function<void(std::string_view line)> sink);

namespace internal {

// One message being built; written by the destructor.
class LogMessage {
 public:
  LogMessage(LogLevel level, std::string_view subsystem);
  ~LogMessage();
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::string_view subsystem_;
  std::ostringstream stream_;
};

// Gives the `cond ? (void)0 : Voidify() & stream` expression type void on both sides.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

inline constexpr LogLevel kLogLevel_DEBUG = LogLevel::kDebug;
inline constexpr LogLevel kLogLevel_INFO = LogLevel::kInfo;
inline constexpr LogLevel kLogLevel_WARNING = LogLevel::kWarning;
inline constexpr LogLevel kLogLevel_ERROR = LogLevel::kError;

}  // namespace internal
}  // namespace tandem

// `level` is one of DEBUG, INFO, WARNING, ERROR; `subsystem` a short string ("train", "nccl").
#define TANDEM_LOG(level, subsystem)                                                           \
  !::tandem::LogEnabled(::tandem::internal::kLogLevel_##level, (subsystem))                    \
      ? (void)0                                                                                \
      : ::tandem::internal::LogVoidify() &                                                     \
            ::tandem::internal::LogMessage(::tandem::internal::kLogLevel_##level, (subsystem)) \
                .stream()

// Like TANDEM_LOG, written only when `cond` is true. `cond` is evaluated only when the level and
// subsystem are enabled.
#define TANDEM_LOG_IF(level, subsystem, cond)                                                  \
  !(::tandem::LogEnabled(::tandem::internal::kLogLevel_##level, (subsystem)) && (cond))        \
      ? (void)0                                                                                \
      : ::tandem::internal::LogVoidify() &                                                     \
            ::tandem::internal::LogMessage(::tandem::internal::kLogLevel_##level, (subsystem)) \
                .stream()
