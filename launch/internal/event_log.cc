// EventLog: supervisor.jsonl plus stderr.
#include "launch/internal/event_log.h"

#include <cerrno>
#include <cstring>

#include "launch/internal/process.h"

namespace tandem::launch::internal {

StatusOr<EventLog> EventLog::Open(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "a");
  if (!f) return UnavailableError(StrCat("cannot open '", path, "': ", std::strerror(errno)));
  return EventLog(f);
}

EventLog::~EventLog() {
  if (file_) std::fclose(file_);
}

void EventLog::Emit(const std::string& event, nlohmann::json fields, const std::string& message) {
  nlohmann::json line = {{"time", UnixTime()}, {"event", event}};
  for (auto it = fields.begin(); it != fields.end(); ++it) line[it.key()] = it.value();
  line["message"] = message;
  std::fprintf(file_, "%s\n",
               line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  std::fflush(file_);
  std::fprintf(stderr, "tandem run: %s\n", message.c_str());
}

}  // namespace tandem::launch::internal
