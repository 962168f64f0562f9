// Line-oriented Unix-socket I/O between a snapshot agent and its trainers: one request line, one
// reply line, every wait with a deadline.
#pragma once

#include <string>

#include "core/status.h"

namespace tandem::checkpoint::internal {

// A connected stream socket (move-only; closes in the destructor) with its read buffer.
class LineConn {
 public:
  LineConn() = default;
  explicit LineConn(int fd) : fd_(fd) {}
  ~LineConn();
  LineConn(LineConn&& o) noexcept : fd_(o.fd_), buffer_(std::move(o.buffer_)) { o.fd_ = -1; }
  LineConn& operator=(LineConn&& o) noexcept;
  LineConn(const LineConn&) = delete;
  LineConn& operator=(const LineConn&) = delete;

  int fd() const { return fd_; }
  // Writes `line` and '\n'. Unavailable when the peer has gone.
  Status WriteLine(const std::string& line, double timeout_s);
  // The next line without its '\n'. Unavailable at end of stream, DeadlineExceeded on timeout.
  StatusOr<std::string> ReadLine(double timeout_s);
  // A whole line already buffered or readable now without blocking; nullopt-like empty status
  // (kUnavailable) when the peer closed. Used by the agent's poll loop.
  StatusOr<bool> FillOnce();
  bool HasLine() const { return buffer_.find('\n') != std::string::npos; }
  std::string TakeLine();

 private:
  int fd_ = -1;
  std::string buffer_;
};

StatusOr<LineConn> ConnectUnix(const std::string& path, double timeout_s);
// Listening socket at `path` (an old socket file there is removed). Returns the fd.
StatusOr<int> ListenUnix(const std::string& path);

}  // namespace tandem::checkpoint::internal
