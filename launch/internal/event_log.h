// The supervisor's record of what it decided: one JSON object per line in
// <run_dir>/supervisor.jsonl ({"time": unix seconds, "event": name, ...fields, "message": text})
// and the same message as one line on stderr ("tandem run: message").
//
// Ownership: owns its file. Thread-safety: one thread.
#pragma once

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "core/status.h"

namespace tandem::launch::internal {

class EventLog {
 public:
  static StatusOr<EventLog> Open(const std::string& path);
  EventLog(EventLog&& other) noexcept : file_(other.file_) { other.file_ = nullptr; }
  EventLog& operator=(EventLog&&) = delete;
  EventLog(const EventLog&) = delete;
  ~EventLog();

  // Appends {"time", "event", fields..., "message"} (flushed) and prints the message.
  void Emit(const std::string& event, nlohmann::json fields, const std::string& message);

 private:
  explicit EventLog(std::FILE* file) : file_(file) {}
  std::FILE* file_;
};

}  // namespace tandem::launch::internal
